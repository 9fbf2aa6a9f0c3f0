"""The file tools on a temporary git repository: reading, listing, searching,
writing and editing, every refusal, byte-exact CRLF/BOM/encoding preservation,
and the per-turn undo journal."""

from __future__ import annotations

import codecs
import os
import subprocess

import pytest

from magnetar.tools.base import ToolContext
from magnetar.tools.edit import EditFile, UndoJournal, WriteFile
from magnetar.tools.files import Glob, Grep, ListDir, ReadFile, matches_glob


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "core.py").write_text("def alpha():\n    return 1\n\n\ndef beta():\n    return 2\n")
    (root / "src" / "main.py").write_text("from pkg.core import alpha\nprint(alpha())\n")
    (root / "README.md").write_text("# demo\nalpha is documented here\n")
    (root / "build").mkdir()
    (root / "build" / "gen.py").write_text("alpha = 'generated'\n")
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "debug.log").write_text("alpha in a log\n")
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


@pytest.fixture
def ctx(repo):
    return ToolContext(root=repo, permissions="yolo", undo=UndoJournal())


def call(tool, ctx, **arguments):
    return tool().call(arguments, ctx)


# -- reading ----------------------------------------------------------------------------------


def test_read_file_numbers_lines_and_reads_ranges(ctx):
    whole = call(ReadFile, ctx, path="src/pkg/core.py")
    assert whole.ok
    assert whole.text.splitlines()[0] == "     1\tdef alpha():"
    assert "     6\t    return 2" in whole.text
    part = call(ReadFile, ctx, path="src/pkg/core.py", start_line=5, end_line=6)
    assert part.text.splitlines() == ["     5\tdef beta():", "     6\t    return 2"]


def test_read_file_long_file_is_cut_with_a_notice(ctx, repo):
    (repo / "long.txt").write_text("".join(f"line {i}\n" for i in range(1, 2501)))
    first = call(ReadFile, ctx, path="long.txt")
    assert "  1000\tline 1000" in first.text and "line 1001" not in first.text
    assert "call read_file with start_line=1001" in first.text
    rest = call(ReadFile, ctx, path="long.txt", start_line=2001)
    assert rest.text.splitlines()[-1] == "  2500\tline 2500"


def test_read_file_refusals(ctx, repo, tmp_path):
    assert "binary" in call(ReadFile, ctx, path="image.bin").text
    assert "does not exist" in call(ReadFile, ctx, path="nope.py").text
    assert "folder" in call(ReadFile, ctx, path="src").text
    (tmp_path / "secret.txt").write_text("outside\n")
    outside = call(ReadFile, ctx, path="../secret.txt")
    assert not outside.ok and "outside the project" in outside.text
    assert not call(ReadFile, ctx, path=str(tmp_path / "secret.txt")).ok
    os.symlink(tmp_path / "secret.txt", repo / "escape.txt")
    escaped = call(ReadFile, ctx, path="escape.txt")
    assert not escaped.ok and "outside the project" in escaped.text
    assert "past the end" in call(ReadFile, ctx, path="README.md", start_line=9).text


def test_read_file_shows_utf16_and_latin1_text(ctx, repo):
    (repo / "wide.txt").write_bytes(codecs.BOM_UTF16_LE + "héllo\r\nwörld\r\n".encode("utf-16-le"))
    assert call(ReadFile, ctx, path="wide.txt").text.splitlines() == ["     1\théllo", "     2\twörld"]
    (repo / "legacy.txt").write_bytes("café\n".encode("latin-1"))
    assert call(ReadFile, ctx, path="legacy.txt").text == "     1\tcafé"


# -- listing and searching ----------------------------------------------------------------------


def test_list_dir(ctx):
    listing = call(ListDir, ctx, path=".").text.splitlines()
    assert listing[:3] == ["build/", "src/", ".gitignore  (13 bytes)"]
    assert ".git/" not in listing
    assert not call(ListDir, ctx, path="README.md").ok


def test_glob_honours_gitignore_and_folder_semantics(ctx):
    assert call(Glob, ctx, pattern="**/*.py").text.splitlines() == ["src/main.py", "src/pkg/core.py"]
    assert call(Glob, ctx, pattern="*.py").text.splitlines() == ["src/main.py", "src/pkg/core.py"]
    assert call(Glob, ctx, pattern="src/*.py").text.splitlines() == ["src/main.py"]
    assert call(Glob, ctx, pattern="*.py", path="src/pkg").text == "src/pkg/core.py"
    assert "no files match" in call(Glob, ctx, pattern="*.log").text


def test_glob_patterns():
    assert matches_glob("a/b/c.py", "**/*.py") and matches_glob("c.py", "**/*.py")
    assert matches_glob("a/b/c.py", "a/**/c.py") and not matches_glob("a/b/c.py", "a/*.py")
    assert matches_glob("x/test_1.py", "test_[0-9].py") and not matches_glob("x/test_a.py", "test_[0-9].py")


def test_grep_regex_gitignore_binary_and_context(ctx, repo):
    hits = call(Grep, ctx, pattern=r"alpha\(").text.splitlines()
    assert hits == ["src/main.py:2:print(alpha())", "src/pkg/core.py:1:def alpha():"]
    everything = call(Grep, ctx, pattern="alpha").text
    assert "build/gen.py" not in everything and "debug.log" not in everything and "image.bin" not in everything
    assert "README.md:2:alpha is documented here" in everything
    assert call(Grep, ctx, pattern="ALPHA", ignore_case=True, glob="*.md").text == "README.md:2:alpha is documented here"
    around = call(Grep, ctx, pattern="def beta", context=1).text.splitlines()
    assert around == ["src/pkg/core.py-4-", "src/pkg/core.py:5:def beta():", "src/pkg/core.py-6-    return 2"]
    capped = call(Grep, ctx, pattern="alpha", max_matches=2)
    assert capped.text.count("\n") == 2 and "stopped at 2 matches" in capped.text
    bad = call(Grep, ctx, pattern="(unclosed")
    assert not bad.ok and "bad regular expression" in bad.text


def test_grep_outside_git_skips_build_folders(tmp_path):
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.js").write_text("needle\n")
    (tmp_path / "a.js").write_text("needle\n")
    plain = ToolContext(root=tmp_path)
    assert call(Grep, plain, pattern="needle").text == "a.js:1:needle"


# -- writing and editing ------------------------------------------------------------------------


def test_write_file_creates_and_replaces_after_a_read(ctx, repo):
    made = call(WriteFile, ctx, path="new/dir/hello.txt", content="hi\n")
    assert made.ok and (repo / "new/dir/hello.txt").read_bytes() == b"hi\n" and "+hi" in made.diff
    refused = call(WriteFile, ctx, path="README.md", content="clobbered\n")
    assert not refused.ok and "read README.md with read_file" in refused.text
    call(ReadFile, ctx, path="README.md")
    assert call(WriteFile, ctx, path="README.md", content="# new\n").ok
    assert (repo / "README.md").read_text() == "# new\n"


def test_edit_exact_replacement_and_refusals(ctx, repo):
    path = repo / "src/pkg/core.py"
    assert "read src/pkg/core.py with read_file" in call(EditFile, ctx, path="src/pkg/core.py",
                                                          old_text="return 1", new_text="return 10").text
    call(ReadFile, ctx, path="src/pkg/core.py")
    done = call(EditFile, ctx, path="src/pkg/core.py", old_text="    return 1\n", new_text="    return 10\n")
    assert done.ok and "line 2" in done.text and "-    return 1\n+    return 10\n" in done.diff
    assert path.read_text().startswith("def alpha():\n    return 10\n")
    ambiguous = call(EditFile, ctx, path="src/pkg/core.py", old_text="    return", new_text="    yield")
    assert not ambiguous.ok and "occurs 2 times" in ambiguous.text and "lines 2, 6" in ambiguous.text
    missing = call(EditFile, ctx, path="src/pkg/core.py", old_text="def gamma():", new_text="x")
    assert not missing.ok and "not found" in missing.text
    spaced = call(EditFile, ctx, path="src/pkg/core.py", old_text="def beta():\n  return 2", new_text="x")
    assert "lines 5-6 match it apart from whitespace" in spaced.text
    assert call(EditFile, ctx, path="src/pkg/core.py", old_text="    return", new_text="    yield",
                replace_all=True).ok
    assert path.read_text().count("yield") == 2


def test_edit_refuses_a_file_changed_on_disk_since_it_was_read(ctx, repo):
    call(ReadFile, ctx, path="src/main.py")
    (repo / "src/main.py").write_text("from pkg.core import alpha\nprint(alpha() + 1)\n")
    stale = call(EditFile, ctx, path="src/main.py", old_text="print", new_text="log")
    assert not stale.ok and "changed on disk since you read it" in stale.text
    assert (repo / "src/main.py").read_text().endswith("alpha() + 1)\n")
    call(ReadFile, ctx, path="src/main.py")
    assert call(EditFile, ctx, path="src/main.py", old_text="print", new_text="log").ok


def test_edit_preserves_crlf_bom_and_mixed_endings_byte_for_byte(ctx, repo):
    original = codecs.BOM_UTF8 + b"first\r\nsecond line\r\nthird\n\xc3\xa9t\xc3\xa9\r\n"
    (repo / "win.txt").write_bytes(original)
    call(ReadFile, ctx, path="win.txt")
    # the model writes LF; the file keeps its CRLF and its BOM, and the LF-only line stays LF
    assert call(EditFile, ctx, path="win.txt", old_text="first\nsecond line", new_text="first\nsecond, edited").ok
    assert (repo / "win.txt").read_bytes() == original.replace(b"second line", b"second, edited")
    assert call(EditFile, ctx, path="win.txt", old_text="été", new_text="summer").ok
    assert (repo / "win.txt").read_bytes() == codecs.BOM_UTF8 + b"first\r\nsecond, edited\r\nthird\nsummer\r\n"


def test_edit_preserves_utf16_and_latin1_encodings(ctx, repo):
    (repo / "wide.txt").write_bytes(codecs.BOM_UTF16_LE + "one\r\ntwo\r\n".encode("utf-16-le"))
    call(ReadFile, ctx, path="wide.txt")
    assert call(EditFile, ctx, path="wide.txt", old_text="two", new_text="zwei").ok
    assert (repo / "wide.txt").read_bytes() == codecs.BOM_UTF16_LE + "one\r\nzwei\r\n".encode("utf-16-le")
    (repo / "legacy.txt").write_bytes(b"caf\xe9 au lait\n")
    call(ReadFile, ctx, path="legacy.txt")
    assert call(EditFile, ctx, path="legacy.txt", old_text="au lait", new_text="noir").ok
    assert (repo / "legacy.txt").read_bytes() == b"caf\xe9 noir\n"
    cannot = call(EditFile, ctx, path="legacy.txt", old_text="noir", new_text="\u2615")
    assert not cannot.ok and "latin-1" in cannot.text


def test_write_keeps_crlf_and_permission_bits(ctx, repo):
    script = repo / "run.sh"
    script.write_bytes(b"echo a\r\necho b\r\n")
    script.chmod(0o755)
    call(ReadFile, ctx, path="run.sh")
    assert call(WriteFile, ctx, path="run.sh", content="echo c\necho d\n").ok
    assert script.read_bytes() == b"echo c\r\necho d\r\n"
    assert script.stat().st_mode & 0o777 == 0o755
    assert not [p for p in repo.iterdir() if ".magnetar-" in p.name]  # no temp file left behind


def test_edits_respect_the_mode(repo):
    (repo / "a.txt").write_text("x\n")
    asked = []
    for mode, answer, ok in (("read-only", True, False), ("ask", False, False), ("ask", True, True),
                             ("auto-edit", False, True)):
        ctx = ToolContext(root=repo, permissions=mode, confirm=lambda title, detail: asked.append(detail) or answer)
        call(ReadFile, ctx, path="a.txt")
        result = call(EditFile, ctx, path="a.txt", old_text="x", new_text="y")
        assert result.ok == ok, mode
        if ok:
            (repo / "a.txt").write_text("x\n")
    assert len(asked) == 2 and "+y" in asked[0]  # only ask mode asked, showing the diff


def test_write_and_edit_refuse_outside_root_and_symlink_escape(ctx, repo, tmp_path):
    (tmp_path / "target.txt").write_text("keep\n")
    os.symlink(tmp_path / "target.txt", repo / "link.txt")
    for tool, args in ((WriteFile, {"content": "x"}), (EditFile, {"old_text": "keep", "new_text": "x"})):
        for path in ("../target.txt", "link.txt", str(tmp_path / "target.txt")):
            result = call(tool, ctx, path=path, **args)
            assert not result.ok and "outside the project" in result.text
    assert (tmp_path / "target.txt").read_text() == "keep\n"


def test_undo_restores_the_last_turn_byte_for_byte(ctx, repo):
    core = repo / "src/pkg/core.py"
    before = core.read_bytes()
    ctx.undo.begin_turn()
    call(ReadFile, ctx, path="src/pkg/core.py")
    call(EditFile, ctx, path="src/pkg/core.py", old_text="return 1", new_text="return 100")
    call(EditFile, ctx, path="src/pkg/core.py", old_text="return 2", new_text="return 200")
    call(WriteFile, ctx, path="notes.txt", content="made this turn\n")
    ctx.undo.begin_turn()
    ctx.undo.begin_turn()  # turns that changed nothing are skipped
    outcome = ctx.undo.undo_last_turn()
    assert outcome.restored == [repo / "notes.txt", core] and outcome.refused == []
    assert core.read_bytes() == before and not (repo / "notes.txt").exists()
    assert ctx.undo.undo_last_turn().restored == []
