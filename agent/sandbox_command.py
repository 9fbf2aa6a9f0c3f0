"""``magnetar sandbox [--mode MODE] [--allow-network] -- COMMAND ARGS...``: one
command run exactly as the agent's shell tool runs it (same sandbox, same
confinement, same output cut, same log), so a person can see what the agent
may do; exits with the command's exit code. Also the sandbox options every
front end shares (``tool_options``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from magnetar.runtime import UsageError
from magnetar.tools import sandbox
from magnetar.tools.base import ToolContext
from magnetar.tools.shell import CommandResult, Shell

from .models import data_dir
from .toolset import project_root

REFUSED_EXIT, TIMEOUT_EXIT = 126, 124  # as a shell reports "cannot run" and timeout(1) a timeout


def tool_options(args: argparse.Namespace) -> dict[str, bool]:
    """ToolContext's sandbox fields from the command line; the way out says so loudly."""
    unsandboxed = getattr(args, "dangerously_no_sandbox", False)
    if unsandboxed:
        print(sandbox.NO_SANDBOX_WARNING, file=sys.stderr)
    return {"allow_network": getattr(args, "allow_network", False), "sandbox": not unsandboxed}


def run(args: argparse.Namespace) -> int:
    words = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not words:
        raise UsageError("no command given", "magnetar sandbox -- COMMAND ARGS...")
    # One word is a command line for bash (as the model writes it); several are quoted as given.
    command = words[0] if len(words) == 1 else shlex.join(words)
    options = tool_options(args)
    if options["sandbox"] and (why := sandbox.unavailable()):
        print(f"magnetar: not run: no OS sandbox here ({why})", file=sys.stderr)
        return REFUSED_EXIT
    # The person typed the command: that is the approval the agent would have asked for.
    ctx = ToolContext(root=project_root(Path.cwd()), permissions=args.mode, confirm=lambda title, detail: True,
                      data_dir=data_dir(), **options)
    result = Shell().call({"command": command, "timeout_s": args.timeout_s, "cwd": str(Path.cwd().resolve())}, ctx)
    if not isinstance(result, CommandResult):  # refused before it ran
        print(result.text, file=sys.stderr)
        return REFUSED_EXIT
    print(result.text)
    if result.exit_code is None:
        return TIMEOUT_EXIT
    return result.exit_code if result.exit_code >= 0 else 128 - result.exit_code
