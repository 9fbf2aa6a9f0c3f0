"""Git: ``git_status``, ``git_diff``, ``git_log``, ``git_show``, ``git_commit``.

There is deliberately no push, reset, rebase or amend: history the user has
not seen leaves the machine only by the user's hand. A commit asks first
unless the mode is yolo. Refs and paths from the model are checked before they
reach git (a ref may not start with ``-``, so it cannot become an option).
Every call goes through ``safegit.run_git``: a repository's config runs no
program (fsmonitor, hooks, filters, diff drivers...).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root
from .safegit import run_git

MAX_OUTPUT_CHARS = 40_000


@dataclass(frozen=True)
class Repo:
    working_tree_dir: Path


def open_repo(ctx: ToolContext) -> Repo:
    try:
        done = run_git(ctx.root, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.TimeoutExpired):
        raise ToolRefused("git could not be run (is it installed?)") from None
    top = done.stdout.decode("utf-8", "surrogateescape").rstrip("\n")
    if done.returncode != 0 or not top:
        raise ToolRefused(f"{ctx.root} is not inside a git repository")
    return Repo(Path(top).resolve())


def _ref(value: str) -> str:
    if not value or value.startswith("-") or any(c in value for c in " \t\n\0"):
        raise ToolRefused(f"{value!r} is not a git revision")
    return value


def _paths(ctx: ToolContext, repo: Repo, paths: list[str]) -> list[str]:
    """Project paths as git wants them (relative to the work tree), refused outside the project."""
    top = repo.working_tree_dir
    out = []
    for p in paths:
        full = resolve_in_root(ctx, p)
        out.append(full.relative_to(top).as_posix() if full.is_relative_to(top) else str(full))
    return out


def _git(repo: Repo, sub: str, *args: str) -> str:
    colourless = ["--no-color"] if sub in ("diff", "show", "log") else []
    try:
        done = run_git(repo.working_tree_dir, sub, *colourless, *args, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ToolRefused(f"git {sub} failed: {err}") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
        raise ToolRefused(f"git {sub} failed: {message}")
    text = done.stdout.decode("utf-8", "replace")
    return text[:-1] if text.endswith("\n") else text  # no final newline, as the tools always showed it


def _clip(text: str, what: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return text[:MAX_OUTPUT_CHARS] + f"\n[{what} cut at {MAX_OUTPUT_CHARS} of {len(text)} characters; narrow it with path]"


class GitStatus(Tool):
    name = "git_status"
    description = "The branch and the changed, staged and untracked files of the repository."

    class Args(BaseModel):
        pass

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        repo = open_repo(ctx)
        text = _git(repo, "status", "--short", "--branch")
        changed = max(0, len(text.splitlines()) - 1)
        return ToolResult(text or "(clean)", summary=f"{changed} changed files")


class GitDiff(Tool):
    name = "git_diff"
    description = ("Show changes as a unified diff: unstaged changes by default, staged ones with staged=true, "
                   "or the work tree against a revision with ref.")

    class Args(BaseModel):
        staged: bool = Field(False, description="show what is staged for the next commit")
        ref: str | None = Field(None, description="compare the work tree with this revision (branch, tag, hash)")
        paths: list[str] = Field(default_factory=list, description="limit to these files or folders")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        repo = open_repo(ctx)
        cmd = ["diff"] + (["--cached"] if args.staged else []) + ([_ref(args.ref)] if args.ref else [])
        text = _git(repo, *cmd, "--", *_paths(ctx, repo, args.paths))
        files = text.count("\ndiff --git ") + text.startswith("diff --git ")
        return ToolResult(_clip(text, "diff") or "(no differences)", summary=f"diff: {files} files")


class GitLog(Tool):
    name = "git_log"
    description = "Recent commits (hash, date, author, subject), newest first."

    class Args(BaseModel):
        max_count: int = Field(20, ge=1, le=200, description="how many commits")
        ref: str | None = Field(None, description="start from this revision (default HEAD)")
        path: str | None = Field(None, description="only commits touching this file or folder")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        repo = open_repo(ctx)
        cmd = ["log", f"--max-count={args.max_count}", "--date=short", "--format=%h %ad %an: %s"]
        if args.ref:
            cmd.append(_ref(args.ref))
        cmd += ["--", *_paths(ctx, repo, [args.path] if args.path else [])]
        text = _git(repo, *cmd)
        return ToolResult(text or "(no commits)", summary=f"{len(text.splitlines())} commits")


class GitShow(Tool):
    name = "git_show"
    description = ("Show a commit (message, changed files and patch), or a file as it was at a revision "
                   "when path is given.")

    class Args(BaseModel):
        ref: str = Field("HEAD", description="the revision")
        path: str | None = Field(None, description="show this file's content at the revision instead")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        repo = open_repo(ctx)
        ref = _ref(args.ref)
        if args.path:
            (rel,) = _paths(ctx, repo, [args.path])
            text = _git(repo, "show", f"{ref}:{rel}")
            return ToolResult(_clip(text, "file"), summary=f"{rel} at {ref}")
        text = _git(repo, "show", "--stat", "--patch", ref)
        return ToolResult(_clip(text, "commit"), summary=f"commit {ref}")


class GitCommit(Tool):
    name = "git_commit"
    description = ("Commit: stages the given paths (or, with all=true, every tracked change) and commits "
                   "with the message. The user approves each commit unless in yolo mode.")
    access = "commit"

    class Args(BaseModel):
        message: str = Field(min_length=1, description="the commit message (subject line first)")
        paths: list[str] = Field(default_factory=list, description="files to stage before committing")
        all: bool = Field(False, description="stage every change to tracked files first")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        repo = open_repo(ctx)
        paths = _paths(ctx, repo, args.paths)
        preview = _git(repo, "status", "--short")
        verdict = ctx.permit("commit", "commit", f"{args.message}\n\n{preview}")
        if verdict == "read-only":
            raise ToolRefused("read-only mode: commits are not allowed")
        if verdict == "declined":
            raise ToolRefused("the user declined the commit")
        if paths:
            _git(repo, "add", "--", *paths)
        if args.all:
            _git(repo, "add", "--update")
        if not _git(repo, "diff", "--cached", "--name-only"):
            raise ToolRefused("nothing is staged; pass paths or all=true")
        _git(repo, "commit", "--quiet", "-m", args.message)
        sha = _git(repo, "rev-parse", "--short=10", "HEAD")
        stat = _git(repo, "show", "--stat", "--format=", "HEAD").strip()
        return ToolResult(f"committed {sha}: {args.message.splitlines()[0]}\n{stat}",
                          summary=f"committed {sha}")


GIT_TOOLS: tuple[type[Tool], ...] = (GitStatus, GitDiff, GitLog, GitShow, GitCommit)
READ_GIT_TOOLS: tuple[type[Tool], ...] = (GitStatus, GitDiff, GitLog, GitShow)

