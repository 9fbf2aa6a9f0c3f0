"""``shell``: one command in the project, inside the OS sandbox (tools/sandbox.py),
in its own process group, with a timeout.

The sandbox is the wall: writes outside the project (and a private temp dir)
fail, ``.git/`` is read-only, the network is off unless allowed, and its PID
namespace ends every process of the command on timeout (``setsid`` ones too).
stdin is closed (a command waiting for input gets EOF instead of hanging the
agent); on timeout or interrupt the process group gets SIGTERM, then SIGKILL.
The model sees the exit status and the head and tail of the output; the output
is logged under the data folder (each log and the folder capped in bytes).
Commands matching the deny list (``dangerous``) are a courtesy: they ask the
user in every mode, yolo included, and are refused where nobody can answer
(headless). Where no sandbox can be set up, every command asks the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from pydantic import BaseModel, Field

from . import sandbox
from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root

HEAD_LINES, TAIL_LINES = 60, 140
MAX_LINE_CHARS = 500
KILL_GRACE_S = 2.0
KEEP_LOGS = 200  # outputs kept on disk, newest first
KEEP_LOG_BYTES = 256 << 20  # and at most this much of them in all
LOG_HEAD_BYTES, LOG_TAIL_BYTES = 4 << 20, 4 << 20  # a longer output's log keeps its ends
_LOG_NUMBERS = count(1)
SEGMENT_SPLIT = re.compile(r"\|\||&&|[;|&\n]")


def dangerous(command: str, root: Path, cwd: Path | None = None) -> str | None:
    """Why ``command`` must be confirmed by a person whatever the mode, or None."""
    root, cwd = root.resolve(), (cwd or root).resolve()
    flat = " ".join(command.split())
    if re.search(r"\b(curl|wget|fetch)\b[^|]*\|\s*(sudo\s+)?(ba|z|da|k)?sh\b|\b(curl|wget)\b[^|]*\|\s*python", flat):
        return "pipes a download into a shell"
    if re.search(r":\s*\(\s*\)\s*\{", flat):
        return "a fork bomb"
    for target in re.findall(r">>?\s*([^\s;&|]+)", command):
        if target in ("/dev/null", "/dev/stdout", "/dev/stderr") or target.startswith("&"):
            continue
        if target.startswith("/dev/"):
            return f"writes to the device {target}"
        if _outside(target, root, cwd):
            return f"writes to {target}, outside the project"
    for segment in SEGMENT_SPLIT.split(command):
        try:
            words = shlex.split(segment)
        except ValueError:
            words = segment.split()
        while words and (words[0] in ("sudo", "doas", "env", "nohup", "time", "command", "exec")
                         or re.fullmatch(r"\w+=.*", words[0])):
            if words[0] in ("sudo", "doas"):
                return "runs as root"
            words = words[1:]
        if not words:
            continue
        reason = _dangerous_words(words, root, cwd)
        if reason:
            return reason
    return None


def _dangerous_words(words: list[str], root: Path, cwd: Path) -> str | None:
    program, args = Path(words[0]).name, words[1:]
    flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    long_flags = {a for a in args if a.startswith("--")}
    paths = [a for a in args if not a.startswith("-")]
    if program == "rm" and ("r" in flags.lower() or "f" in flags or {"--recursive", "--force"} & long_flags):
        for p in paths:
            if _outside(p, root, cwd) or _absolute(p, cwd) == root:
                return f"rm -r/-f of {p}, outside the project or the whole project"
    if program in ("mkfs", "dd", "shutdown", "reboot", "halt", "poweroff") or program.startswith("mkfs."):
        return f"{program} can destroy data or stop the machine"
    if program in ("chmod", "chown") and ("R" in flags or "--recursive" in long_flags):
        if any(_outside(p, root, cwd) for p in paths[1:]):
            return f"recursive {program} outside the project"
    if program in ("cp", "mv", "tee", "ln", "install", "rsync") and paths:
        dest = paths if program == "tee" else paths[-1:]
        for p in dest:
            if _outside(p, root, cwd):
                return f"{program} writes to {p}, outside the project"
    if program == "git" and args:
        sub = args[0]
        if sub == "push" and ({"--force", "--force-with-lease", "--mirror", "--delete"} & long_flags
                              or "f" in flags or "d" in flags or any(a.startswith("+") for a in paths[1:])
                              or any(a.startswith("--force") for a in long_flags)):
            return "git push that rewrites or deletes remote history"
        if sub == "reset" and "--hard" in long_flags:
            return "git reset --hard discards uncommitted work"
        if sub == "clean" and "f" in flags:
            return "git clean -f deletes untracked files"
        if sub in ("checkout", "restore") and "." in paths[1:]:
            return f"git {sub} . discards uncommitted work"
    return None


def _outside(path: str, root: Path, cwd: Path) -> bool:
    """Whether a path named in a command lies outside the project (``~`` and variables count as outside)."""
    if path.startswith(("~", "$")) or "$HOME" in path or "${HOME}" in path:
        return True
    full = _absolute(path, cwd)
    return full != root and root not in full.parents


def _absolute(path: str, cwd: Path) -> Path:
    full = Path(os.path.normpath(Path(path) if os.path.isabs(path) else cwd / path))
    try:
        return full.resolve()
    except OSError:
        return full


@dataclass
class CommandResult(ToolResult):
    exit_code: int | None = None  # the command's own; None when we stopped it


class Shell(Tool):
    name = "shell"
    description = ("Run a shell command (bash) in the project and return its exit status and output "
                   "(stdout and stderr together; long output shows its head and tail). stdin is closed: "
                   "never run interactive programs. Use a timeout that fits the command. It runs in a "
                   "sandbox: only the project and $TMPDIR are writable, .git is read-only (commit with "
                   "git_commit), the network is off unless the user allowed it, and background processes "
                   "end with the command.")
    access = "shell"

    class Args(BaseModel):
        command: str = Field(description="the command line")
        timeout_s: int = Field(120, ge=1, le=3600, description="seconds before the command is killed")
        cwd: str = Field(".", description="working folder, relative to the project root")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        cwd = resolve_in_root(ctx, args.cwd)
        if not cwd.is_dir():
            raise ToolRefused(f"{args.cwd} is not a folder")
        no_wall = sandbox.unavailable() if ctx.sandbox else None
        risks = [why for why in (dangerous(args.command, ctx.root, cwd),
                                 no_wall and f"without an OS sandbox: {no_wall}") if why]
        # In read-only mode the sandbox makes nothing writable; running is still the user's call.
        title = (f"run a risky command ({'; '.join(risks)})" if risks
                 else "run a command (read-only sandbox)" if ctx.permissions == "read-only" else "run a command")
        verdict = ctx.permit("shell", title, args.command, always_ask=bool(risks))
        if verdict == "read-only":
            raise ToolRefused("read-only mode without the sandbox: shell commands are not allowed")
        if verdict == "declined" and risks:
            reason = "; ".join(r.replace("without an OS sandbox", "no OS sandbox") for r in risks)
            raise ToolRefused(f"not run: {reason}; this needs the user's approval, which was not given")
        if verdict == "declined":
            raise ToolRefused("the user declined to run this command; ask them what they want instead")
        return run_command(args.command, cwd, args.timeout_s, ctx, sandboxed=ctx.sandbox and not no_wall)


def run_command(command: str, cwd: Path, timeout_s: float, ctx: ToolContext, *, sandboxed: bool) -> ToolResult:
    log = _log_path(ctx)
    env = {**os.environ, "PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "TERM": "dumb"}
    argv = ["bash", "-c", command]
    scratch = Path(tempfile.mkdtemp(prefix="magnetar-sh-")) if sandboxed else None
    if scratch:
        argv = sandbox.confine(argv, ctx.root, scratch, writable=ctx.permissions != "read-only",
                               network=ctx.allow_network, cwd=cwd)
    started = time.monotonic()
    try:
        proc, capture, stopped = _watch(argv, cwd, env, log, timeout_s, ctx)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    status = f"exit status {proc.returncode}" if not stopped else f"{stopped} (exit status {proc.returncode})"
    text = f"$ {command}\n[{status}, {elapsed:.1f} s, {capture.bytes} bytes of output]\n{capture.text(log)}".rstrip()
    ok = proc.returncode == 0 and not stopped
    return CommandResult(text, ok=ok, summary=f"{status}: {command[:80]}",
                         exit_code=None if stopped else proc.returncode)


def _watch(argv: list[str], cwd: Path, env: dict[str, str], log: Path | None, timeout_s: float,
           ctx: ToolContext) -> tuple[subprocess.Popen, _Capture, str | None]:
    """Run ``argv`` to its end, the timeout or an interrupt; its output goes to ``log``."""
    started = time.monotonic()
    with _CappedLog(log) as sink:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        capture = _Capture()
        reader = threading.Thread(target=capture.drain, args=(proc.stdout, sink), daemon=True)
        reader.start()
        cancel = ctx.cancel
        stopped = None
        while proc.poll() is None:
            if time.monotonic() - started > timeout_s:
                stopped = f"killed after the {timeout_s:g} s timeout"
            elif cancel is not None and cancel.is_set():
                stopped = "interrupted by the user"
            if stopped:
                _kill_group(proc)
                break
            time.sleep(0.05)
        reader.join(timeout=1.0)
        if reader.is_alive():  # a background child still holds the output pipe
            _kill_group(proc)
            reader.join(timeout=KILL_GRACE_S)
            stopped = stopped or "background processes it left running were stopped"
    return proc, capture, stopped


class _CappedLog:
    """A command's log: its first LOG_HEAD_BYTES, a cut mark, its last LOG_TAIL_BYTES."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "wb") if path else None
        self.written = self.cut = self.tail_size = 0
        self.tail: deque[bytes] = deque()

    def write(self, data: bytes) -> None:
        if self.file is None:
            return
        head = data[:max(0, LOG_HEAD_BYTES - self.written)]
        self.file.write(head)
        self.written += len(head)
        if len(head) < len(data):
            self.tail.append(data[len(head):])
            self.tail_size += len(data) - len(head)
            while self.tail_size - len(self.tail[0]) >= LOG_TAIL_BYTES:  # whole chunks the tail no longer needs
                self.tail_size -= len(self.tail[0])
                self.cut += len(self.tail.popleft())

    def __enter__(self) -> _CappedLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is None:
            return
        tail = b"".join(self.tail)
        extra = max(0, len(tail) - LOG_TAIL_BYTES)
        if self.cut + extra:
            self.file.write(f"\n[... {self.cut + extra} bytes cut from the middle ...]\n".encode())
        self.file.write(tail[extra:])
        self.file.close()


class _Capture:
    """The first and last lines of a command's output (bounded memory) and its totals."""

    def __init__(self) -> None:
        self.head: list[bytes] = []
        self.tail: deque[bytes] = deque(maxlen=TAIL_LINES)
        self.lines = self.bytes = 0

    def drain(self, stream, sink) -> None:
        # bounded reads: one endless line must not fill our memory
        for line in iter(lambda: stream.readline(1 << 16), b""):
            sink.write(line)
            self.lines += 1
            self.bytes += len(line)
            (self.head if len(self.head) < HEAD_LINES else self.tail).append(line[:MAX_LINE_CHARS * 4])
        stream.close()

    def text(self, log: Path | None) -> str:
        omitted = self.lines - len(self.head) - len(self.tail)
        parts = [_show(self.head)]
        if omitted:
            where = f"; the full output is in {log}" if log else ""
            parts.append(f"... [{omitted} lines cut from the middle{where}]")
        parts.append(_show(self.tail))
        return "\n".join(p for p in parts if p)


def _show(chunk) -> str:
    out = []
    for raw in chunk:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        out.append(line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " ... [line cut]")
    return "\n".join(out)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # the leader is gone; children that ignore SIGTERM still get SIGKILL
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _log_path(ctx: ToolContext) -> Path | None:
    if ctx.data_dir is None:
        return None
    folder = ctx.data_dir / "shell-logs"
    folder.mkdir(parents=True, exist_ok=True)
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    sizes = [p.stat().st_size for p in logs]
    total, room = sum(sizes), KEEP_LOG_BYTES - LOG_HEAD_BYTES - LOG_TAIL_BYTES - 100  # for the new log
    for k, old in enumerate(logs):  # the oldest go: the folder stays bounded in files and bytes
        if len(logs) - k < KEEP_LOGS and total <= room:
            break
        old.unlink(missing_ok=True)
        total -= sizes[k]
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_LOG_NUMBERS)}.log"


SHELL_TOOLS: tuple[type[Tool], ...] = (Shell,)
