"""The git tools (git through safegit.run_git) on a temporary repository: status, diffs
(unstaged, staged, against a ref), log, show, and commits with their refusals."""

from __future__ import annotations

import subprocess

import pytest

from magnetar.tools.base import ToolContext
from magnetar.tools.git_tools import GitCommit, GitDiff, GitLog, GitShow, GitStatus


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=T", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Tester")
    git(root, "config", "user.email", "tester@example.com")
    (root / "app.py").write_text("x = 1\n")
    git(root, "add", "app.py")
    git(root, "commit", "-q", "-m", "first commit")
    (root / "app.py").write_text("x = 2\n")
    git(root, "commit", "-qam", "second commit")
    return root


def call(tool, root, mode="yolo", confirm=None, **arguments):
    return tool().call(arguments, ToolContext(root=root, permissions=mode, confirm=confirm))


def test_status_and_diffs(repo):
    assert call(GitStatus, repo).text == "## main"
    (repo / "app.py").write_text("x = 3\n")
    (repo / "new.py").write_text("y = 1\n")
    status = call(GitStatus, repo).text.splitlines()
    assert status == ["## main", " M app.py", "?? new.py"]
    unstaged = call(GitDiff, repo).text
    assert "-x = 2\n+x = 3" in unstaged and "\x1b[" not in unstaged
    assert call(GitDiff, repo, staged=True).text == "(no differences)"
    git(repo, "add", "app.py")
    assert "+x = 3" in call(GitDiff, repo, staged=True).text
    against_first = call(GitDiff, repo, ref="HEAD~1", paths=["app.py"]).text
    assert "-x = 1\n+x = 3" in against_first


def test_log_and_show(repo):
    log = call(GitLog, repo).text.splitlines()
    assert [line.split(": ", 1)[1] for line in log] == ["second commit", "first commit"]
    assert log[0].endswith(" T: second commit")
    assert len(call(GitLog, repo, max_count=1).text.splitlines()) == 1
    shown = call(GitShow, repo, ref="HEAD~1").text
    assert "first commit" in shown and "+x = 1" in shown
    assert call(GitShow, repo, ref="HEAD~1", path="app.py").text == "x = 1"


def test_refusals(repo, tmp_path):
    for tool, args in ((GitShow, {"ref": "--output=/tmp/pwned"}), (GitDiff, {"ref": "-p"}),
                       (GitLog, {"ref": "--all"})):
        result = call(tool, repo, **args)
        assert not result.ok and "not a git revision" in result.text
    assert "outside the project" in call(GitDiff, repo, paths=["../elsewhere"]).text
    assert "failed" in call(GitShow, repo, ref="no-such-branch").text
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not inside a git repository" in call(GitStatus, plain).text


def test_commit_stages_paths_and_asks_unless_yolo(repo):
    (repo / "new.py").write_text("y = 1\n")
    declined = call(GitCommit, repo, mode="ask", confirm=lambda t, d: False, message="add new", paths=["new.py"])
    assert not declined.ok and "declined" in declined.text and len(git(repo, "log", "--oneline").splitlines()) == 2
    assert "read-only" in call(GitCommit, repo, mode="read-only", message="add new", paths=["new.py"]).text
    shown = []
    done = call(GitCommit, repo, mode="ask", confirm=lambda t, d: shown.append(d) or True, message="add new",
                paths=["new.py"])
    assert done.ok and "committed" in done.text and "new.py" in done.text
    assert "?? new.py" in shown[0]  # the user saw what would be committed
    assert git(repo, "log", "-1", "--format=%s").strip() == "add new"
    assert "nothing is staged" in call(GitCommit, repo, message="empty").text
    (repo / "app.py").write_text("x = 4\n")
    assert call(GitCommit, repo, message="bump", all=True).ok
    assert git(repo, "status", "--porcelain") == ""


def test_first_commit_in_an_empty_repository(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.name", "Tester")
    git(tmp_path, "config", "user.email", "tester@example.com")
    (tmp_path / "a.txt").write_text("a\n")
    assert call(GitCommit, tmp_path, message="root", paths=["a.txt"]).ok
    assert call(GitLog, tmp_path).text.endswith("Tester: root")
