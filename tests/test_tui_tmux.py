"""The real ``magnetar`` binary in a real terminal (tmux) against a tiny model:
the TUI opens, /help answers, a prompt prefills and streams (noise: random
weights), Ctrl+C interrupts, /quit saves the session, and ``magnetar
--continue`` reopens it with its KV state and draws the conversation again."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
BINARY = Path(sys.executable).parent / "magnetar"


class Terminal:
    def __init__(self, tmp_path: Path):
        self.socket = f"magnetar-test-{os.getpid()}-{tmp_path.name}"  # a server per test: teardowns never race
        self.log = tmp_path / "screens.txt"

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)
        if done.returncode:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, name: str, command: str) -> None:
        self.tmux("new-session", "-d", "-s", name, "-x", "140", "-y", "40", command)
        self.tmux("resize-window", "-t", name, "-x", "140", "-y", "40")  # a detached session may start at 80x24

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name)

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", name, *keys)

    def wait(self, name: str, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.screen(name))
            if found:
                return found
            time.sleep(0.2)
        self.log.write_text(self.screen(name))
        raise AssertionError(f"{pattern!r} never appeared; the last screen:\n{self.screen(name)}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def term(tmp_path):
    t = Terminal(tmp_path)
    yield t
    t.close()


@needs_tmux
def test_the_real_binary_in_a_terminal(tiny_models, tmp_path, term):
    if not BINARY.exists():
        pytest.skip(f"no magnetar script next to {sys.executable}")
    model = tiny_models("q8")
    repo = tmp_path / "proj"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    # COLUMNS/LINES (pytest may export them) would override the terminal's real size
    env = f"unset COLUMNS LINES; cd {shlex.quote(str(repo))} && MAGNETAR_HOME={shlex.quote(str(tmp_path / 'home'))}"
    run = f"{env} {BINARY} --model {shlex.quote(str(model))} --ctx 4096 --mode read-only"

    term.start("first", f"{run}; echo EXITED $?; sleep 600")
    term.wait("first", r"ready │ ctx 0/4096 .* read-only │ tiny-q8")
    term.keys("first", "/help", "Enter")
    term.wait("first", r"/switch ID")
    term.keys("first", "hello there", "Enter")
    term.wait("first", r"busy │")
    term.wait("first", r"reasoning")  # the first sampled tokens arrived
    term.keys("first", "C-c")
    term.wait("first", r"turn ended: interrupted")
    tokens = int(term.wait("first", r"ready │ ctx (\d+)/4096").group(1))
    assert tokens > 1000  # system prompt, tool schemas and the question were prefilled
    term.keys("first", "/quit", "Enter")
    session = term.wait("first", r"session saved: (\S+) ").group(1)
    term.wait("first", r"EXITED 0")

    term.start("again", f"{run} --continue; echo EXITED $?; sleep 600")
    term.wait("again", rf"ready │ ctx {tokens}/4096")  # the KV state is back, nothing prefilled
    screen = term.wait("again", rf"session {session}").string
    assert "hello there" in screen
    term.keys("again", "/quit", "Enter")
    term.wait("again", r"EXITED 0")


@needs_tmux
def test_without_a_model_the_first_run_screen_says_what_to_do(tmp_path, term):
    if not BINARY.exists():
        pytest.skip(f"no magnetar script next to {sys.executable}")
    home = shlex.quote(str(tmp_path / "home"))
    term.start("bare", f"unset COLUMNS LINES MAGNETAR_MODEL; cd {shlex.quote(str(tmp_path))} && "
                       f"MAGNETAR_HOME={home} {BINARY}; echo EXITED $?; sleep 600")
    screen = term.wait("bare", r"Press q to leave").string
    assert "No DeepSeek V4 Flash model was found" in screen
    assert "magnetar download q2-imatrix" in screen and "96 GB or more RAM" in screen
    term.keys("bare", "q")
    term.wait("bare", r"EXITED 2")


def test_without_a_model_or_a_terminal_it_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MAGNETAR_MODEL"} | {"MAGNETAR_HOME": str(tmp_path)}
    run = subprocess.run([str(BINARY)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("magnetar: error: no model")
    assert "magnetar download q2-imatrix" in run.stderr and "Traceback" not in run.stderr
