"""Running git without letting a repository run programs.

A repository's config (``.git/config``: a cloned project ships it, a model can
write it) names programs git starts on ordinary reads: ``core.fsmonitor`` on
status, filter drivers (``.gitattributes`` + ``filter.<driver>.clean``) on
status, diff and add, textconv and external diff drivers on diff/show/log,
hooks on commit, gpg for signatures, ssh, proxies and credential helpers for a
partial clone's lazy fetch. Every git call the program makes goes through
``run_git``, which switches each of them off with command-scope config (the
highest priority; git passes it on to the git processes it starts itself).
The user's identity and other harmless settings still come from their config.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Fixed keys that would otherwise name a program to run.
NEUTRAL_CONFIG = {
    "core.fsmonitor": "false",
    "core.hooksPath": os.devnull,  # no hooks at all: pre-commit, post-commit, reference-transaction...
    "core.pager": "cat",
    "core.editor": "false",
    "sequence.editor": "false",
    "core.askPass": "",
    "credential.helper": "",  # an empty value clears the helper list
    "core.sshCommand": "false",
    "core.gitProxy": "",
    "protocol.allow": "never",  # no transport at all, so no lazy fetch of a partial clone either
    "commit.gpgSign": "false",
    "tag.gpgSign": "false",
    "log.showSignature": "false",
    "gpg.program": "false",
    "gpg.ssh.program": "false",
    "gpg.x509.program": "false",
    "gpg.ssh.defaultKeyCommand": "false",
    # A submodule's work tree is looked at by a git run inside it, under the submodule's own config,
    # whose filter drivers the blanking below cannot see: compare submodules by commit only.
    "diff.ignoreSubmodules": "dirty",
    "status.submoduleSummary": "false",
    # Names that are not UTF-8 come out octal-quoted (\377), which resolve_in_root reads back;
    # a user's quotePath=false would print raw bytes that decode to U+FFFD and open nothing.
    "core.quotePath": "true",
}
# Filter driver keys are per driver name, so each configured driver is blanked by name (an empty
# clean/smudge/process means "no filter"; required=false keeps git from failing on the missing filter).
FILTER_KEYS = {"clean": "", "smudge": "", "process": "", "required": "false"}
# Diff drivers cannot be blanked (an empty textconv is an error), so these options turn them off.
DIFF_SUBCOMMANDS = {"diff", "show", "log"}
NO_DIFF_PROGRAMS = ["--no-ext-diff", "--no-textconv"]
# The user's environment can name programs too; a repository read needs none of them.
DROPPED_ENV = ("GIT_EXTERNAL_DIFF", "GIT_PAGER", "GIT_EDITOR", "GIT_SEQUENCE_EDITOR", "GIT_ASKPASS", "SSH_ASKPASS",
               "GIT_SSH", "GIT_SSH_COMMAND", "GIT_PROXY_COMMAND", "GIT_CONFIG_PARAMETERS")


def _with_config(env: dict[str, str], pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``env`` plus ``pairs`` as GIT_CONFIG_KEY_n/VALUE_n (no quoting rules, unlike ``-c``)."""
    env = dict(env)
    start = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    for n, (key, value) in enumerate(pairs, start):
        env[f"GIT_CONFIG_KEY_{n}"], env[f"GIT_CONFIG_VALUE_{n}"] = key, value
    env["GIT_CONFIG_COUNT"] = str(start + len(pairs))
    return env


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_PAGER="cat", PAGER="cat")
    return _with_config(env, list(NEUTRAL_CONFIG.items()))


def _filter_drivers(root: Path, env: dict[str, str]) -> set[str]:
    """The filter driver names any config level defines (reading config runs nothing)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "config", "-z", "--name-only", "--get-regexp", r"^filter\."],
                             capture_output=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    names = out.stdout.decode("utf-8", "surrogateescape").split("\0")
    return {name.split(".", 1)[1].rsplit(".", 1)[0] for name in names if name.count(".") >= 2}


def safe_git(root: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of ``git -C root ARGS`` with every program-running setting off."""
    env = _base_env()
    blanks = [(f"filter.{driver}.{key}", value) for driver in sorted(_filter_drivers(root, env))
              for key, value in FILTER_KEYS.items()]
    env = _with_config(env, blanks)
    args = list(args)
    if args and args[0] in DIFF_SUBCOMMANDS:
        args[1:1] = NO_DIFF_PROGRAMS
    return ["git", "--no-pager", "-C", str(root), *args], env


def run_git(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run git safely (see ``safe_git``); stdout and stderr captured as bytes. Raises OSError when git
    is missing and subprocess.TimeoutExpired past ``timeout`` seconds."""
    argv, env = safe_git(root, *args)
    return subprocess.run(argv, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=timeout)
