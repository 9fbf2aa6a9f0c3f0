"""Untrusted file names and paths (issue 14, section 4): a file whose name is not
valid UTF-8 is listed, searched, mapped and reviewed with its bad bytes shown as
``\\xNN`` escapes, and that escaped name opens the file again; nothing a tool
returns can hold a lone surrogate (which the tokenizer cannot encode); and a
path with a NUL, a too-long name, a symlink loop or a file for a folder is
refused in one line by every tool that takes a path, never raised."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from magnetar.agent import review_mode
from magnetar.cli import build_parser, main
from magnetar.agent.loop import Agent, LoopSettings, ToolFinished, TurnEnd
from magnetar.tools.base import Tool, ToolContext, ToolResult
from magnetar.tools.edit import EditFile, UndoJournal, WriteFile
from magnetar.tools.files import Glob, Grep, ListDir, ReadFile
from magnetar.tools.git_tools import GitDiff, GitLog, GitShow, GitStatus
from magnetar.tools.repo_map import RepoMap
from magnetar.tools.review import ReportFinding
from scripted_engine import NoPrefixCache, ScriptedEngine
from test_agent_loop import block, call
from test_headless import scripted  # noqa: F401  (the fixture)

BAD = b"bad\xff name.py"  # 0xff never occurs in UTF-8
SHOWN = r"bad\xff name.py"  # how the model sees it
SOURCE = b"def broken_thing():\n    return 1\n"


def utf8_clean(text: str | None) -> bool:
    try:
        (text or "").encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@pytest.fixture(params=["git", "plain"])
def project(tmp_path, request):
    root = tmp_path / "proj"
    root.mkdir()
    if request.param == "git":
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "ok.py").write_text("def fine():\n    return broken_thing()\n")
    with open(os.path.join(os.fsencode(root), BAD), "wb") as fh:
        fh.write(SOURCE)
    return root


def run(tool, ctx, **arguments) -> ToolResult:
    result = tool().call(arguments, ctx)
    assert utf8_clean(result.text) and utf8_clean(result.summary) and utf8_clean(result.diff)
    return result


@pytest.mark.parametrize("tool, arguments", [
    (ListDir, {}), (Glob, {"pattern": "*.py"}), (Grep, {"pattern": "return"}), (RepoMap, {}),
])
def test_listing_tools_show_a_non_utf8_name_escaped(project, tool, arguments):
    result = run(tool, ToolContext(root=project), **arguments)
    assert result.ok and SHOWN in result.text


def test_the_shown_name_opens_reads_and_edits_the_file(project):
    ctx = ToolContext(root=project, permissions="yolo", undo=UndoJournal())
    listed = run(ListDir, ctx).text
    name = next(line.split("  (")[0] for line in listed.splitlines() if line.startswith("bad"))
    assert name == SHOWN
    read = run(ReadFile, ctx, path=name)
    assert read.ok and "def broken_thing():" in read.text and read.summary.startswith(SHOWN)
    edited = run(EditFile, ctx, path=name, old_text="return 1", new_text="return 2")
    assert edited.ok and SHOWN in edited.diff
    assert (project / os.fsdecode(BAD)).read_bytes() == SOURCE.replace(b"return 1", b"return 2")
    written = run(WriteFile, ctx, path=name, content="x = 3\n")
    assert written.ok and (project / os.fsdecode(BAD)).read_bytes() == b"x = 3\n"
    assert not (project / SHOWN).exists()  # no file named with a literal backslash was made


@pytest.mark.parametrize("quote_path", ["true", "false"])
def test_a_name_as_git_quotes_it_opens_the_file_too(tmp_path, quote_path):
    """git_status and git_diff show the byte in octal (``"bad\\377 name.py"``), as git quotes names,
    even where the repository's config says core.quotePath=false (raw bytes would open nothing)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "config", "core.quotePath", quote_path], check=True)
    with open(os.path.join(os.fsencode(tmp_path), BAD), "wb") as fh:
        fh.write(SOURCE)
    ctx = ToolContext(root=tmp_path)
    status = run(GitStatus, ctx).text
    assert r'"bad\377 name.py"' in status
    quoted = status.splitlines()[-1].split('"')[1]
    assert "def broken_thing" in run(ReadFile, ctx, path=quoted).text


def test_a_literal_backslash_name_is_taken_as_written(tmp_path):
    """The escape is only a fallback: a real file spelled like an escape wins."""
    (tmp_path / SHOWN).write_text("literal\n")
    with open(os.path.join(os.fsencode(tmp_path), BAD), "wb") as fh:
        fh.write(b"escaped\n")
    assert "literal" in run(ReadFile, ToolContext(root=tmp_path), path=SHOWN).text


def test_a_tool_returning_a_lone_surrogate_is_escaped_at_the_door(tmp_path):
    class Leaky(Tool):
        name, description = "leaky", "Returns what no tokenizer can encode."

        class Args(BaseModel):
            pass

        def run(self, args, ctx):
            return ToolResult("name \udcff and \ud800", summary="s\udcfe", diff="d\udc80")

    result = run(Leaky, ToolContext(root=tmp_path))
    assert (result.text, result.summary, result.diff) == (r"name \xff and \ud800", r"s\xfe", r"d\x80")


def test_an_agent_turn_over_a_non_utf8_name(project, v4_tokenizer):
    """The crash the probe found: the tokenizer got the surrogate name (TypeError)."""
    engine = ScriptedEngine(v4_tokenizer, ["</think>" + block(call("list_dir"), call("grep", pattern="return")),
                                           "</think>" + block(call("read_file", path=SHOWN)),
                                           "</think>Read it."])
    agent = Agent(engine, [ListDir(), Grep(), ReadFile()], ToolContext(root=project), "sys", LoopSettings())
    events = list(agent.turn("look"))
    assert isinstance(events[-1], TurnEnd) and events[-1].reason == "answered"
    results = [e.result for e in events if isinstance(e, ToolFinished)]
    assert all(r.ok for r in results) and "def broken_thing" in results[-1].text


def test_review_of_a_non_utf8_name(project, v4_tokenizer, monkeypatch, capsys):
    """``magnetar review`` lists the file escaped, takes a finding on it, writes every format."""
    finding = dict(file=SHOWN, start_line="2", end_line="2", severity="high", title="returns a constant",
                   explanation="broken_thing always returns 1, whatever happens")
    replies = ["</think>" + block(call("report_finding", **finding)), "</think>One finding."]
    monkeypatch.setenv("MAGNETAR_HOME", str(project.parent / "home"))
    monkeypatch.setattr(review_mode, "resolve_model", lambda explicit: Path("model.gguf"))
    made = []
    monkeypatch.setattr(review_mode, "PrefixCache", NoPrefixCache)
    for fmt in ("json", "sarif", "markdown"):
        made.append(ScriptedEngine(v4_tokenizer, list(replies)))
        monkeypatch.setattr(review_mode.Engine, "load", lambda path, ctx, engine=made[-1], **options: engine)
        out = project.parent / f"review.{fmt}"
        args = build_parser().parse_args(["review", str(project), "--format", fmt, "-o", str(out)])
        assert review_mode.run(args) == 0
        assert SHOWN in v4_tokenizer.decode(made[-1].prefills[0])  # the scope lists it escaped
        text = out.read_text(encoding="utf-8")
        assert "returns a constant" in text
    assert json.loads((project.parent / "review.json").read_text())["findings"][0]["file"] == SHOWN


def test_headless_run_over_a_non_utf8_name(project, scripted, capsys):  # noqa: F811
    model, _ = scripted(["</think>" + block(call("glob", pattern="*.py")), "</think>Two files."])
    code = main(["run", "-m", model, "--cwd", str(project), "--json", "-p", "list the code"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and events[-1]["answer"] == "Two files."
    finished = next(e for e in events if e["type"] == "ToolFinished")
    assert SHOWN in finished["result"]["text"]


# -- paths the OS refuses -----------------------------------------------------------------------


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "file.txt").write_text("x\n")
    os.symlink("loop", root / "loop")  # points at itself
    return root


BAD_PATHS = {
    "nul": "a\0b.txt",
    "too long": "x" * 300,
    "symlink loop": "loop",
    "inside a symlink loop": "loop/inner.txt",
    "a file as a folder": "file.txt/inner.txt",
    "unknown home": "~no-such-user-here/x",
    "unencodable": "a\ud800b",
}

PATH_TOOLS = [
    (ReadFile, lambda p: {"path": p}), (ListDir, lambda p: {"path": p}),
    (Glob, lambda p: {"pattern": "*", "path": p}), (Grep, lambda p: {"pattern": "x", "path": p}),
    (RepoMap, lambda p: {"path": p}), (RepoMap, lambda p: {"focus": [p]}),
    (WriteFile, lambda p: {"path": p, "content": "y\n"}),
    (EditFile, lambda p: {"path": p, "old_text": "x", "new_text": "y"}),
    (ReportFinding, lambda p: dict(file=p, start_line=1, end_line=1, severity="low", title="abc",
                                   explanation="long enough text")),
    (GitDiff, lambda p: {"paths": [p]}), (GitLog, lambda p: {"path": p}), (GitShow, lambda p: {"path": p}),
]


@pytest.mark.parametrize("tool, arguments", PATH_TOOLS, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("kind", BAD_PATHS)
def test_a_hostile_path_is_refused_in_one_line(hostile, tool, arguments, kind):
    result = run(tool, ToolContext(root=hostile, permissions="yolo"), **arguments(BAD_PATHS[kind]))
    if tool is RepoMap and "focus" in arguments("x"):  # a focus that is no file is a symbol name
        assert result.ok
        return
    assert not result.ok and result.text.startswith("error: ") and "\n" not in result.text
    assert (hostile / "file.txt").read_text() == "x\n"


def test_os_errors_name_the_path_and_the_reason(hostile):
    result = run(WriteFile, ToolContext(root=hostile, permissions="yolo"), path="file.txt/inner.txt", content="y\n")
    assert result.text == "error: file.txt/inner.txt: Not a directory"
    assert "File name too long" in run(ReadFile, ToolContext(root=hostile), path="x" * 300).text
    assert "symbolic links" in run(ReadFile, ToolContext(root=hostile), path="loop").text


def test_an_os_error_inside_a_tool_becomes_a_refusal(tmp_path):
    """What resolve_in_root cannot foresee (a file gone meanwhile, a bad descriptor) reaches Tool.call."""
    class Racy(Tool):
        name, description = "racy", "Touches the file system."

        class Args(BaseModel):
            which: str

        def run(self, args, ctx):
            if args.which == "file":
                (ctx.root / "gone" / "b\udcffd.txt").read_bytes()
            os.close(-1)

    gone = run(Racy, ToolContext(root=tmp_path), which="file")
    assert gone.text == r"error: gone/b\xffd.txt: No such file or directory"
    assert run(Racy, ToolContext(root=tmp_path), which="fd").text == "error: Bad file descriptor"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway, so EACCES cannot happen here")
def test_permission_denied_is_a_refusal(hostile):
    secret = hostile / "secret.txt"
    secret.write_text("s\n")
    secret.chmod(0)
    result = run(ReadFile, ToolContext(root=hostile), path="secret.txt")
    assert result.text == "error: secret.txt: Permission denied"


def test_programming_errors_are_not_hidden(tmp_path):
    class Buggy(Tool):
        name, description = "buggy", "Has a bug."

        class Args(BaseModel):
            pass

        def run(self, args, ctx):
            return {}["missing"]

    with pytest.raises(KeyError):
        Buggy().call({}, ToolContext(root=tmp_path))


def test_headless_json_events_carry_a_model_written_surrogate(project, scripted, capsys):  # noqa: F811
    """A JSON parameter may spell a lone surrogate (``"\\ud800"``); the event stream must still print."""
    D = "｜DSML｜"
    invoke = (f'<{D}invoke name="repo_map">\n<{D}parameter name="focus" string="false">["\\ud800x", "\\udcff"]'
              f"</{D}parameter>\n</{D}invoke>")
    model, _ = scripted([f"</think>\n\n<{D}tool_calls>\n{invoke}\n</{D}tool_calls>", "</think>Mapped."])
    assert main(["run", "-m", model, "--cwd", str(project), "--json", "-p", "map it"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    running = next(e for e in events if e["type"] == "ToolRunning")
    assert running["arguments"] == {"focus": ["\ud800x", "\udcff"]}  # JSON's own escapes: nothing lost
    assert events[-1]["answer"] == "Mapped."
