"""Issue 14 §2: a repository's git config runs no program when the tools or ``review`` use git.

Every setting below points at a script that leaves a marker file; a repository
planted with all of them (in .git/config, hooks, .gitattributes and
.git/info/attributes) goes through every git tool, the file listing that asks
git, and ``review`` in its PATH and diff modes. No marker may appear.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from magnetar.agent.loop import LoopSettings
from magnetar.agent.review_mode import review, scope_text
from magnetar.tools.base import ToolContext
from magnetar.tools.files import Glob, Grep
from magnetar.tools.git_tools import GitCommit, GitDiff, GitLog, GitShow, GitStatus
from magnetar.tools.safegit import run_git
from scripted_engine import ScriptedEngine
from test_agent_loop import block, call

HOOKS = ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-index-change",
         "reference-transaction", "pre-auto-gc", "post-checkout")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout


def planted_script(folder: Path, name: str, markers: Path) -> str:
    """A program that records that it ran (under ``name``) and passes stdin through, as a filter would."""
    script = folder / f"evil-{name}"
    script.write_text(f"#!/bin/sh\ntouch '{markers / name}'\ncat\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def planted(tmp_path):
    """A repository with one commit, a dirty file, and every program-running setting planted."""
    root, tools, markers = tmp_path / "repo", tmp_path / "tools", tmp_path / "markers"
    for folder in (root, tools, markers):
        folder.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "app.py").write_text("x = 1\n")
    (root / "data.txt").write_text("one\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "base")
    # Attributes after the commit, so the planted repository is what a clone of it would look like.
    (root / ".gitattributes").write_text("* filter=evil diff=evil merge=evil\n")
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "attributes").write_text("*.py filter=evil2 diff=evil2\n")
    planted_keys = {
        "core.fsmonitor": "fsmonitor", "core.pager": "pager", "pager.status": "pager-status",
        "pager.diff": "pager-diff", "pager.log": "pager-log", "pager.show": "pager-show",
        "core.sshCommand": "ssh", "core.gitProxy": "gitproxy", "core.askPass": "askpass",
        "core.editor": "editor", "sequence.editor": "seq-editor", "diff.external": "diff-external",
        "diff.evil.textconv": "textconv", "diff.evil.command": "diff-command",
        "diff.evil2.textconv": "textconv2", "diff.evil2.command": "diff-command2",
        "filter.evil.clean": "clean", "filter.evil.smudge": "smudge", "filter.evil.process": "process",
        "filter.evil2.clean": "clean2", "filter.evil2.smudge": "smudge2",
        "merge.evil.driver": "merge-driver", "gpg.program": "gpg", "gpg.ssh.program": "gpg-ssh",
        "gpg.x509.program": "gpg-x509", "core.alternateRefsCommand": "alternate-refs",
    }
    for key, name in planted_keys.items():
        git(root, "config", key, planted_script(tools, name, markers))
    git(root, "config", "credential.helper", "!" + planted_script(tools, "credential", markers))
    for key, value in {"commit.gpgSign": "true", "log.showSignature": "true", "filter.evil.required": "true",
                       "status.submoduleSummary": "true"}.items():
        git(root, "config", key, value)
    hooks = tools / "hooks"
    hooks.mkdir()
    for hook in HOOKS:
        planted_script(hooks, hook, markers)
        (hooks / f"evil-{hook}").rename(hooks / hook)
        (root / ".git" / "hooks" / hook).symlink_to(hooks / hook)
    git(root, "config", "core.hooksPath", str(hooks))
    # A dirty work tree with a stale stat, so status and diff must look at (and would filter) the contents.
    (root / "app.py").write_text("x = 2\n")
    (root / "data.txt").write_text("two\n")
    os.utime(root / "data.txt", (1_000_000_000, 1_000_000_000))
    return root, markers


def test_every_planted_program_runs_when_git_is_used_plainly(planted):
    """The plant is real: plain git runs the programs the tools must not (this is what a user's git does)."""
    root, markers = planted
    subprocess.run(["git", "-C", str(root), "status"], capture_output=True)
    subprocess.run(["git", "-C", str(root), "diff"], capture_output=True)
    ran = {p.name for p in markers.iterdir()}
    assert {"fsmonitor", "textconv", "diff-external"} & ran and ("clean" in ran or "process" in ran)


def test_the_git_tools_run_no_program_from_the_repository(planted):
    root, markers = planted
    ctx = ToolContext(root=root, permissions="yolo")
    results = [
        GitStatus().call({}, ctx), GitDiff().call({}, ctx), GitDiff().call({"staged": True}, ctx),
        GitDiff().call({"ref": "HEAD", "paths": ["app.py"]}, ctx), GitLog().call({}, ctx),
        GitLog().call({"path": "app.py"}, ctx), GitShow().call({}, ctx), GitShow().call({"path": "app.py"}, ctx),
        Glob().call({"pattern": "*.py"}, ctx), Grep().call({"pattern": "x"}, ctx),
        GitCommit().call({"message": "change", "paths": ["app.py", "data.txt"]}, ctx),
        GitLog().call({"max_count": 1}, ctx), GitShow().call({"ref": "HEAD"}, ctx),
    ]
    assert all(r.ok for r in results), [r.text for r in results if not r.ok]
    assert sorted(p.name for p in markers.iterdir()) == []
    status, diff = results[0].text, results[1].text
    assert " M app.py" in status.splitlines() and "-x = 1\n+x = 2" in diff
    assert "committed" in results[10].text and results[11].text.endswith(": change")
    assert git(root, "show", "HEAD:data.txt") == "two\n"  # committed as is: no filter touched the bytes


def test_review_runs_no_program_from_the_repository(planted, v4_tokenizer):
    root, markers = planted
    assert "app.py" in scope_text(root, ".", None, False, False)
    for kwargs in ({"diff_ref": "HEAD", "staged": False, "uncommitted": False},
                   {"diff_ref": None, "staged": False, "uncommitted": True},
                   {"diff_ref": None, "staged": True, "uncommitted": False}):
        if kwargs["staged"]:
            git(root, "-c", "core.hooksPath=/dev/null", "-c", "filter.evil.clean=", "-c", "filter.evil.required=0",
                "-c", "filter.evil2.clean=", "-c", "core.fsmonitor=false", "add", "app.py")
        assert "app.py" in scope_text(root, ".", **kwargs)
    assert sorted(p.name for p in markers.iterdir()) == []
    replies = ["look</think>" + block(call("git_status"), call("git_diff"), call("git_log"), call("git_show"),
                                      call("glob", pattern="*.py")),
               "done</think>Nothing wrong."]
    engine = ScriptedEngine(v4_tokenizer, replies)
    findings, end = review(engine, root, scope_text(root, ".", "HEAD", False, False), LoopSettings())
    assert end.reason == "answered" and findings == []
    assert sorted(p.name for p in markers.iterdir()) == []


def test_the_users_identity_still_comes_from_their_config(planted, tmp_path, monkeypatch):
    root, _ = planted
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Global User\n\temail = global@example.com\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    result = GitCommit().call({"message": "mine", "paths": ["app.py"]}, ToolContext(root=root, permissions="yolo"))
    assert result.ok, result.text
    assert git(root, "log", "-1", "--format=%an <%ae>") == "Global User <global@example.com>\n"


def test_a_driver_name_with_odd_characters_is_still_blanked(planted):
    root, markers = planted
    odd = "we=ird.name"
    (root / ".gitattributes").write_text(f"* filter={odd}\n")
    git(root, "config", f"filter.{odd}.clean", planted_script(root.parent / "tools", "odd-clean", markers))
    done = run_git(root, "status", "--porcelain")
    assert done.returncode == 0 and not list(markers.iterdir())


def test_a_submodules_own_config_runs_no_program(tmp_path):
    sub, top, markers = tmp_path / "sub", tmp_path / "top", tmp_path / "markers"
    for folder in (sub, top, markers):
        folder.mkdir()
    git(sub, "init", "-q", "-b", "main")
    (sub / "f.txt").write_text("hi\n")
    git(sub, "add", ".")
    git(sub, "commit", "-q", "-m", "sub")
    git(top, "init", "-q", "-b", "main")
    git(top, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "lib")
    git(top, "commit", "-q", "-m", "top")
    inner = top / "lib"
    (inner / ".gitattributes").write_text("* filter=inner\n")
    git(inner, "config", "filter.inner.clean", planted_script(tmp_path, "inner-clean", markers))
    git(inner, "config", "core.fsmonitor", planted_script(tmp_path, "inner-fsmonitor", markers))
    (inner / "f.txt").write_text("ho\n")  # same size, stale stat: only the contents can tell
    os.utime(inner / "f.txt", (1_000_000_000, 1_000_000_000))
    ctx = ToolContext(root=top, permissions="yolo")
    results = [GitStatus().call({}, ctx), GitDiff().call({}, ctx), Glob().call({"pattern": "*"}, ctx)]
    assert all(r.ok for r in results), [r.text for r in results]
    assert sorted(p.name for p in markers.iterdir()) == []
