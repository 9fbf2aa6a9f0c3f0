"""Issue 14 §2 and §5: the edit tools never write git's own files unasked, and never lose data:
concurrent edits of one file, /undo over the user's later edits, a UTF-8 file with a stray
byte, and an old_text that overlaps itself."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from magnetar.tools.base import ToolContext
from magnetar.tools.edit import EditFile, UndoJournal, WriteFile
from magnetar.tools.files import ReadFile


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "app.py").write_text("x = 1\n")
    return root


def call(tool, ctx, **arguments):
    return tool().call(arguments, ctx)


class Asked:
    """A user who answers every question with ``answer`` and remembers the questions."""

    def __init__(self, answer: bool):
        self.answer, self.titles = answer, []

    def __call__(self, title: str, detail: str) -> bool:
        self.titles.append(title)
        return self.answer


# -- git's own files (§2) ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto-edit", "yolo"])
def test_writing_git_config_is_refused_unless_the_user_confirms(repo, mode):
    config = repo / ".git" / "config"
    original = config.read_bytes()
    planted = "[core]\n\tfsmonitor = touch /tmp/pwned\n"
    for confirm in (None, Asked(False)):  # headless, then a user who says no
        ctx = ToolContext(root=repo, mode=mode, confirm=confirm)
        assert call(ReadFile, ctx, path=".git/config").ok
        for tool, args in ((WriteFile, {"content": planted}),
                           (EditFile, {"old_text": "[core]", "new_text": planted.rstrip("\n")})):
            result = call(tool, ctx, path=".git/config", **args)
            assert not result.ok and "git's own folder" in result.text
        assert config.read_bytes() == original
        if confirm is not None:
            assert len(confirm.titles) == 2 and ".git/config" in confirm.titles[0]
    user = Asked(True)  # asked even though the mode approves edits outright, and the answer is yes
    ctx = ToolContext(root=repo, mode=mode, confirm=user)
    call(ReadFile, ctx, path=".git/config")
    assert call(WriteFile, ctx, path=".git/config", content=planted).ok
    assert config.read_text() == planted and len(user.titles) == 1


def test_new_hooks_and_other_spellings_of_git_internals_are_refused(repo):
    os.symlink(repo / ".git", repo / "innocent")
    os.symlink(repo / ".git" / "config", repo / "settings.ini")
    ctx = ToolContext(root=repo, mode="yolo", confirm=None)
    call(ReadFile, ctx, path="settings.ini")
    for path in (".git/hooks/pre-commit", "innocent/hooks/post-commit", ".GIT/config", ".Git./hooks/x",
                 "vendor/lib/.git/config", "innocent/config"):
        result = call(WriteFile, ctx, path=path, content="#!/bin/sh\ntouch /tmp/pwned\n")
        assert not result.ok and "git's own folder" in result.text, path
    assert not call(EditFile, ctx, path="settings.ini", old_text="[core]", new_text="[core]\n\tx = 1").ok
    assert not (repo / ".git" / "hooks" / "pre-commit").exists() and not (repo / ".GIT").exists()
    assert not (repo / "vendor").exists()
    # Files that merely look like git's stay editable.
    for path in (".gitignore", ".gitattributes", "git/notes.txt", "my.git.txt"):
        assert call(WriteFile, ctx, path=path, content="ok\n").ok, path


def test_a_separate_git_dir_inside_the_project_is_refused(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q", "--separate-git-dir", str(root / "store"), str(root)], check=True)
    assert (root / ".git").is_file()
    ctx = ToolContext(root=root, mode="yolo", confirm=None)
    call(ReadFile, ctx, path="store/config")
    result = call(EditFile, ctx, path="store/config", old_text="[core]", new_text="[core]\n\tfsmonitor = x")
    assert not result.ok and "git's own folder" in result.text
    assert not call(WriteFile, ctx, path="store/hooks/pre-commit", content="x").ok
    sub = root / "pkg"
    sub.mkdir()
    inner = ToolContext(root=sub, mode="yolo", confirm=None)  # a project below the work tree's top
    assert call(WriteFile, inner, path="ok.txt", content="fine\n").ok
