"""The repo_map tool: definitions per language, ranking, budget, file selection,
confinement to the project and the disk cache."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from magnetar.tools import repo_map
from magnetar.tools.base import ToolContext
from magnetar.tools.repo_map import RepoMap

# tree-sitter-language-pack >= 1.0 fetches grammars over the network on first use;
# without them there is nothing to parse, so the tests that parse are skipped.
LANGS = ("python", "javascript", "typescript", "go", "rust", "c")
needs_grammars = pytest.mark.skipif(not all(repo_map._parser(lang) for lang in LANGS),
                                    reason="tree-sitter grammars are not installed")

SOURCES = {
    "core.py": '''"""core module."""
import os


class Engine:
    def __init__(self, size):
        self.size = size

    def run(self, steps):  # one step at a time
        return steps


def helper(x):
    return x
''',
    "shapes.js": '''export class Shape {
  constructor(name) {
    this.name = name;
  }
  area() {
    return 0;
  }
}

export function makeShape(name) {
  return new Shape(name);
}

export const double = (x) => x * 2;
''',
    "grid.ts": '''export interface Point {
  x: number;
  y: number;
}

export type Id = string;

export function distance(a: Point, b: Point): number {
  return Math.hypot(a.x - b.x, a.y - b.y);
}

export class Grid<T> {
  private cells: T[] = [];
  get(i: number): T {
    return this.cells[i];
  }
}
''',
    "geo.go": '''package geo

type Vec struct {
	X, Y float64
}

func (v Vec) Norm() float64 {
	return v.X*v.X + v.Y*v.Y
}

func Add(a, b int) int {
	return a + b
}
''',
    "counter.rs": '''pub struct Counter {
    count: u32,
}

impl Counter {
    pub fn new() -> Self {
        Counter { count: 0 }
    }
}

pub trait Tick {
    fn tick(&mut self);
}

enum Mode { Fast, Slow }
''',
    "area.c": '''#include <stdio.h>

struct point {
    int x, y;
};

typedef struct {
    int w, h;
} extent;

static int area(struct point *p, int k) {
    return p->x * p->y * k;
}

int *make(void);
''',
}

EXPECTED = {
    "core.py": ["  5 class Engine", "  6   def __init__(self, size)", "  9   def run(self, steps)",
                "  13 def helper(x)"],
    "shapes.js": ["  1 export class Shape", "  2   constructor(name)", "  5   area()",
                  "  10 export function makeShape(name)", "  14 export const double = (x) => x * 2"],
    "grid.ts": ["  1 export interface Point", "  6 export type Id = string",
                "  8 export function distance(a: Point, b: Point): number", "  12 export class Grid<T>",
                "  14   get(i: number): T"],
    "geo.go": ["  3 type Vec struct", "  7 func (v Vec) Norm() float64", "  11 func Add(a, b int) int"],
    "counter.rs": ["  1 pub struct Counter", "  5 impl Counter", "  6   pub fn new() -> Self",
                   "  11 pub trait Tick", "  12   fn tick(&mut self)", "  15 enum Mode"],
    "area.c": ["  3 struct point", "  7 typedef struct ... extent", "  11 static int area(struct point *p, int k)",
               "  15 int *make(void)"],
}


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)


def git_init(root):
    subprocess.run(["git", "init", "-q", str(root)], check=True)


def call(root, **arguments):
    result = RepoMap().call(arguments, ToolContext(root=root, data_dir=root / "data"))
    assert result.ok, result.text
    return result.text


def block(text, name):
    """The lines listed under file ``name``."""
    lines = text.splitlines()
    start = lines.index(name) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


@needs_grammars
def test_definitions_and_lines_in_each_language(tmp_path):
    git_init(tmp_path)
    write(tmp_path, SOURCES)
    text = call(tmp_path, max_tokens=20000)
    for name, expected in EXPECTED.items():
        assert block(text, name) == expected, name
    assert "left out" not in text


@needs_grammars
def test_used_names_rank_first_and_focus_moves_a_file_up(tmp_path):
    git_init(tmp_path)
    write(tmp_path, {"orphan.py": "def gadget():\n    return 1\n",
                     "popular.py": "class Widget:\n    pass\n",
                     **{f"user{i}.py": f"from popular import Widget\nw{i} = Widget()\n" for i in range(3)}})
    order = [line for line in call(tmp_path).splitlines() if line.endswith(".py")]
    assert order.index("popular.py") < order.index("orphan.py")
    for focus in (["orphan.py"], ["gadget"]):
        order = [line for line in call(tmp_path, focus=focus).splitlines() if line.endswith(".py")]
        assert order[0] == "orphan.py", focus


@needs_grammars
def test_budget_cuts_the_map_and_says_what_was_left_out(tmp_path):
    git_init(tmp_path)
    write(tmp_path, {f"pkg/mod{i}.py": "".join(f"def function_{i}_{j}(a, b):\n    return a\n\n"
                                                for j in range(10)) for i in range(30)})
    text = call(tmp_path, max_tokens=200)
    assert len(text) / 4 <= 200
    shown = sum(line.startswith("  ") for line in text.splitlines())
    assert 0 < shown < 300
    assert text.splitlines()[-1].startswith(f"[{300 - shown} more definitions in ")
    assert len(block(call(tmp_path, max_tokens=20000), "pkg/mod7.py")) == 10


@needs_grammars
def test_ignored_binary_big_and_escaping_files_are_not_mapped(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "proj"
    write(outside, {"secret.py": "def leaked():\n    pass\n"})
    git_init(root)
    write(root, {".gitignore": "ignored/\n", "ignored/hidden.py": "def hidden():\n    pass\n",
                 "ok.py": "def visible():\n    pass\n", "blob.py": b"def packed():\x00\x01\x02\n",
                 "big.py": "def huge():\n    pass\n" + "x = 1\n" * 200_000})
    (root / "leak.py").symlink_to(outside / "secret.py")
    text = call(root)
    assert "visible" in text
    for absent in ("hidden", "packed", "huge", "leaked", "leak.py"):
        assert absent not in text


@needs_grammars
def test_without_git_hidden_and_dependency_folders_are_skipped(tmp_path):
    write(tmp_path, {"app.py": "def main():\n    pass\n", "node_modules/lib/x.js": "function dep() {}\n",
                     ".venv/y.py": "def venv_thing():\n    pass\n"})
    text = call(tmp_path)
    assert "def main()" in text and "dep" not in text and "venv_thing" not in text


def test_paths_outside_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "proj", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    ctx = ToolContext(root=root)
    for path in ("..", str(outside), "link"):
        result = RepoMap().call({"path": path}, ctx)
        assert not result.ok and "outside the project" in result.text, path
    assert not RepoMap().call({"path": "missing"}, ctx).ok
    assert not RepoMap().call({"max_tokens": 5}, ctx).ok


@needs_grammars
def test_disk_cache_is_reused_rewritten_when_corrupt_and_keyed_by_content(tmp_path, monkeypatch):
    git_init(tmp_path)
    write(tmp_path, SOURCES)
    parses = []
    real_parse = repo_map._parse
    monkeypatch.setattr(repo_map, "_parse", lambda lang, data: parses.append(lang) or real_parse(lang, data))
    first = call(tmp_path)
    cache = sorted((tmp_path / "data" / "repo_map").glob("*.json"))
    assert len(parses) == len(SOURCES) == len(cache)

    parses.clear()
    assert call(tmp_path) == first and parses == []

    (tmp_path / "core.py").write_text(SOURCES["core.py"] + "\n\ndef added():\n    pass\n")
    assert "  17 def added()" in call(tmp_path) and parses == ["python"]

    parses.clear()
    for entry in cache:
        entry.write_text('{"symbols": [[1, 0')
    (tmp_path / "core.py").write_text(SOURCES["core.py"])
    assert call(tmp_path) == first and len(parses) == len(SOURCES)
    assert all(json.loads(entry.read_text())["symbols"] for entry in cache)
    assert not [name for name in os.listdir(cache[0].parent) if name.endswith(".tmp")]


@needs_grammars
def test_without_data_dir_nothing_is_cached(tmp_path):
    write(tmp_path, {"a.py": "def alpha():\n    pass\n"})
    result = RepoMap().call({}, ToolContext(root=tmp_path))
    assert result.ok and "  1 def alpha()" in result.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py"]
