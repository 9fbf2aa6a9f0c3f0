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
        ctx = ToolContext(root=repo, permissions=mode, confirm=confirm)
        assert call(ReadFile, ctx, path=".git/config").ok
        for tool, args in ((WriteFile, {"content": planted}),
                           (EditFile, {"old_text": "[core]", "new_text": planted.rstrip("\n")})):
            result = call(tool, ctx, path=".git/config", **args)
            assert not result.ok and "git's own folder" in result.text
        assert config.read_bytes() == original
        if confirm is not None:
            assert len(confirm.titles) == 2 and ".git/config" in confirm.titles[0]
    user = Asked(True)  # asked even though the mode approves edits outright, and the answer is yes
    ctx = ToolContext(root=repo, permissions=mode, confirm=user)
    call(ReadFile, ctx, path=".git/config")
    assert call(WriteFile, ctx, path=".git/config", content=planted).ok
    assert config.read_text() == planted and len(user.titles) == 1


def test_new_hooks_and_other_spellings_of_git_internals_are_refused(repo):
    os.symlink(repo / ".git", repo / "innocent")
    os.symlink(repo / ".git" / "config", repo / "settings.ini")
    ctx = ToolContext(root=repo, permissions="yolo", confirm=None)
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
    ctx = ToolContext(root=root, permissions="yolo", confirm=None)
    call(ReadFile, ctx, path="store/config")
    result = call(EditFile, ctx, path="store/config", old_text="[core]", new_text="[core]\n\tfsmonitor = x")
    assert not result.ok and "git's own folder" in result.text
    assert not call(WriteFile, ctx, path="store/hooks/pre-commit", content="x").ok
    sub = root / "pkg"
    sub.mkdir()
    inner = ToolContext(root=sub, permissions="yolo", confirm=None)  # a project below the work tree's top
    assert call(WriteFile, inner, path="ok.txt", content="fine\n").ok


# -- two tool contexts editing one file at once (§5) -------------------------------------------


def test_concurrent_edits_of_one_file_never_lose_an_ok_edit(repo):
    lines, rounds = 8, 12
    target = repo / "shared.txt"
    for _ in range(rounds):
        target.write_text("".join(f"line {i} = old\n" for i in range(lines)))
        contexts = [ToolContext(root=repo, permissions="yolo") for _ in range(lines)]
        for ctx in contexts:
            assert call(ReadFile, ctx, path="shared.txt").ok
        start, results = threading.Barrier(lines), [None] * lines

        def edit(i):
            start.wait()
            results[i] = call(EditFile, contexts[i], path="shared.txt", old_text=f"line {i} = old",
                              new_text=f"line {i} = new")

        threads = [threading.Thread(target=edit, args=(i,)) for i in range(lines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = target.read_text()
        for i, result in enumerate(results):
            if result.ok:
                assert f"line {i} = new" in final, f"edit {i} reported ok but was lost"
            else:
                assert "changed on disk" in result.text and f"line {i} = old" in final
        assert sum(r.ok for r in results) >= 1


# -- /undo leaves the user's own later edits alone (§5) ----------------------------------------


def test_undo_restores_only_what_is_still_the_agents(repo):
    ctx = ToolContext(root=repo, permissions="yolo", undo=UndoJournal())
    (repo / "kept.py").write_text("a = 1\n")
    ctx.undo.begin_turn()
    for name in ("app.py", "kept.py"):
        call(ReadFile, ctx, path=name)
    assert call(EditFile, ctx, path="app.py", old_text="x = 1", new_text="x = 2").ok
    assert call(EditFile, ctx, path="kept.py", old_text="a = 1", new_text="a = 2").ok
    assert call(WriteFile, ctx, path="new.py", content="made by the agent\n").ok
    assert call(WriteFile, ctx, path="untouched_new.py", content="also new\n").ok
    # The user edits two of the agent's files after the turn.
    (repo / "kept.py").write_text("a = 2\nb = 'the user wrote this'\n")
    (repo / "new.py").write_text("made by the agent\nand kept by the user\n")
    outcome = ctx.undo.undo_last_turn()
    assert outcome.restored == [repo / "app.py", repo / "untouched_new.py"]
    assert [p for p, _ in outcome.refused] == [repo / "kept.py", repo / "new.py"]
    assert (repo / "app.py").read_text() == "x = 1\n" and not (repo / "untouched_new.py").exists()
    assert (repo / "kept.py").read_text() == "a = 2\nb = 'the user wrote this'\n"
    assert (repo / "new.py").read_text() == "made by the agent\nand kept by the user\n"
    why = dict(outcome.refused)
    assert "changed since" in why[repo / "kept.py"] and "+b = 'the user wrote this'" in why[repo / "kept.py"]
    assert "+and kept by the user" in why[repo / "new.py"]
    assert ctx.undo.undo_last_turn().restored == []


def test_undo_of_a_file_the_user_deleted_is_refused(repo):
    ctx = ToolContext(root=repo, permissions="yolo", undo=UndoJournal())
    ctx.undo.begin_turn()
    call(ReadFile, ctx, path="app.py")
    assert call(EditFile, ctx, path="app.py", old_text="x = 1", new_text="x = 2").ok
    (repo / "app.py").unlink()
    outcome = ctx.undo.undo_last_turn()
    assert outcome.restored == [] and "deleted" in dict(outcome.refused)[repo / "app.py"]
    assert not (repo / "app.py").exists()


# -- encodings and matching (§5) ---------------------------------------------------------------


def test_a_utf8_file_with_one_stray_byte_stays_utf8(repo):
    data = "naïve = 'café'\nvalue = 1\n".encode() + b"raw = '\xff'\n"
    (repo / "mixed.py").write_bytes(data)
    ctx = ToolContext(root=repo, permissions="yolo")
    shown = call(ReadFile, ctx, path="mixed.py").text
    assert "naïve = 'café'" in shown and "raw = '\\xff'" in shown  # the stray byte shown escaped
    assert call(EditFile, ctx, path="mixed.py", old_text="value = 1", new_text="value = 'größe ✓'").ok
    assert (repo / "mixed.py").read_bytes() == data.replace(b"value = 1", "value = 'größe ✓'".encode())
    assert call(WriteFile, ctx, path="mixed.py", content="naïve = 'café'\n").ok
    assert (repo / "mixed.py").read_bytes() == "naïve = 'café'\n".encode()


def test_overlapping_occurrences_of_old_text_are_ambiguous(repo):
    (repo / "a.txt").write_bytes(b"say aaa\n")
    ctx = ToolContext(root=repo, permissions="yolo")
    call(ReadFile, ctx, path="a.txt")
    result = call(EditFile, ctx, path="a.txt", old_text="aa", new_text="b")
    assert not result.ok and "occurs 2 times" in result.text
    result = call(EditFile, ctx, path="a.txt", old_text="aa", new_text="b", replace_all=True)
    assert not result.ok and "overlap" in result.text
    assert (repo / "a.txt").read_bytes() == b"say aaa\n"
    assert call(EditFile, ctx, path="a.txt", old_text="aaa", new_text="b").ok
    assert (repo / "a.txt").read_bytes() == b"say b\n"


def test_the_tui_undo_reports_the_files_it_left_alone(v4_tokenizer, repo):
    import asyncio

    from magnetar.agent.loop import Agent, LoopSettings
    from magnetar.agent.tui import MagnetarApp
    from scripted_engine import ScriptedEngine
    from test_agent_loop import block, call as dsml_call
    from test_tui import _type, texts, until

    replies = ["w</think>" + block(dsml_call("write_file", path="made.txt", content="agent\n"),
                                   dsml_call("write_file", path="other.txt", content="agent too\n")),
               "x</think>done"]
    ctx = ToolContext(root=repo, permissions="yolo", undo=UndoJournal())
    agent = Agent(ScriptedEngine(v4_tokenizer, replies), [WriteFile()], ctx, "You are a test.", LoopSettings())
    app = MagnetarApp(agent, model_name="scripted")

    async def go():
        async with app.run_test() as pilot:
            await _type(pilot, "go")
            await until(pilot, lambda: not app.busy and (repo / "other.txt").exists())
            (repo / "made.txt").write_text("agent\nuser line\n")
            await _type(pilot, "/undo")
            await until(pilot, lambda: "not undone" in texts(app))
            shown = texts(app)
            assert "restored: " in shown and "other.txt" in shown and "+user line" in shown
    asyncio.run(go())
    assert (repo / "made.txt").read_text() == "agent\nuser line\n" and not (repo / "other.txt").exists()


def _edit_in_a_process(root, i, barrier, results):
    ctx = ToolContext(root=root, permissions="yolo")
    call(ReadFile, ctx, path="shared.txt")
    barrier.wait()
    result = call(EditFile, ctx, path="shared.txt", old_text=f"line {i} = old", new_text=f"line {i} = new")
    results.put((i, result.ok, result.text))


def test_concurrent_edits_from_separate_processes_never_lose_an_ok_edit(repo):
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    workers, target = 4, repo / "shared.txt"
    for _ in range(6):
        target.write_text("".join(f"line {i} = old\n" for i in range(workers)))
        barrier, results = fork.Barrier(workers), fork.Queue()
        procs = [fork.Process(target=_edit_in_a_process, args=(repo, i, barrier, results)) for i in range(workers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        final = target.read_text()
        for i, ok, text in outcomes:
            assert (f"line {i} = new" in final) if ok else ("changed on disk" in text), (i, text)
