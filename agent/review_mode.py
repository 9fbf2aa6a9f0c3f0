"""``magnetar review``: the model reads code, reports findings, and we render them.

Scope (the first user message, built by ``scope_text``):

- ``PATH`` (a file or folder, default the project): the files under it, as git
  lists them (tracked and untracked, ignored ones left out), else a plain walk;
- ``--diff REF``: ``git diff --merge-base REF``, what changed since the branch
  left REF, up to the *working tree* (committed or not), so the ``+`` line
  numbers are the lines the model reads and reports against;
- ``--staged``: ``git diff --cached``;
- ``--uncommitted``: ``git diff HEAD`` (staged and unstaged) plus the names of
  untracked files, whose text no diff shows.

A diff is limited to ``DIFF_BUDGET`` bytes (cut at a line, with a note); a
PATH in a diff mode narrows the diff to it. An empty scope is an error.

Output: Markdown, JSON or SARIF 2.1.0. The JSON object is
``{"version": 1, "tool": "magnetar", "summary": str, "counts": {"high": n,
"medium": n, "low": n}, "findings": [{file, start_line, end_line, severity,
title, explanation, suggested_fix}]}``, findings sorted by severity, then
file and line. SARIF has one rule per severity (``review/high`` ...).

Exit status: 0; 1 when ``--fail-on LEVEL`` is given and a finding is at that
severity or above (no ``--fail-on``: findings never fail the run); 2 when the
model stopped without an answer (step cap, repeat guard, full context...):
the findings it had are still written, and one line on stderr says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote

from magnetar.console import engine_options
from magnetar.prompts import load
from magnetar.runtime import Engine, MagnetarError, PrefixCache, UsageError, atomic_write_bytes
from magnetar.tools.base import Tool, ToolContext, utf8_safe
from magnetar.tools.files import project_files, relative
from magnetar.tools.review import SEVERITIES, ReportFinding
from magnetar.tools.safegit import run_git

from .loop import Agent, LoopSettings, Notice, ToolRunning, TurnEnd
from .models import data_dir, resolve_model
from .toolset import project_root, read_only_tools, with_project_instructions

DIFF_BUDGET = 120_000  # bytes of diff in the prompt (~35k tokens); the model can read the rest with its tools
MAX_LISTED = 1000  # file names listed for a PATH review
RANK = {s: len(SEVERITIES) - k for k, s in enumerate(SEVERITIES)}  # high 3, medium 2, low 1
LEVELS = {"high": "error", "medium": "warning", "low": "note"}
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's empty tree: the base before a first commit


# -- scope ------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    try:
        done = run_git(root, *args, timeout=600)  # the repository's config runs no program
    except OSError:
        raise MagnetarError("git is not installed", "install git, or review a path without --diff/--staged/"
                            "--uncommitted") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise MagnetarError(f"git {args[0]} failed: {message[0]}")
    return done.stdout.decode(errors="replace")  # diffs of non-UTF-8 files must not abort the review


def _git_ok(root: Path, *args: str) -> bool:
    try:
        _git(root, *args)
        return True
    except MagnetarError:
        return False


def _budgeted(diff: str, budget: int) -> str:
    raw = diff.encode()
    if len(raw) <= budget:
        return diff
    cut = raw[:budget]
    cut = cut[:cut.rfind(b"\n") + 1] or cut  # whole lines, so no hunk line is half shown
    return (cut.decode(errors="ignore") + f"[diff truncated: the first {len(cut)} of {len(raw)} bytes are shown; "
            "read the rest with the git and file tools]\n")


def scope_text(root: Path, path: str | Path, diff_ref: str | None, staged: bool, uncommitted: bool,
               budget: int = DIFF_BUDGET) -> str:
    """The user message naming what to review; ``MagnetarError`` when there is nothing to review."""
    if sum((diff_ref is not None, staged, uncommitted)) > 1:
        raise UsageError("--diff, --staged and --uncommitted are alternatives", "pick one")
    root = root.resolve()
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise UsageError(f"{path} is outside the project ({root})")
    if not target.exists():
        raise UsageError(f"{path} does not exist")
    rel = target.relative_to(root).as_posix() if target != root else "."
    if diff_ref is None and not staged and not uncommitted:
        return _path_scope(root, target, rel)
    if not _git_ok(root, "rev-parse", "--is-inside-work-tree"):
        raise MagnetarError(f"nothing to review: {root} is not a git repository, so it has no diff",
                            "review a path instead (magnetar review PATH)")
    if staged:
        args, what = ["--cached"], "the staged changes (git diff --cached)"
    elif uncommitted:
        base = "HEAD" if _git_ok(root, "rev-parse", "--verify", "--quiet", "HEAD") else EMPTY_TREE
        args, what = [base], "the uncommitted changes, staged and not (git diff HEAD)"
    else:
        args = ["--merge-base", diff_ref]
        what = f"the changes since this branch left {diff_ref}, up to the working tree (git diff --merge-base)"
    args = ["diff", "--no-color", "--no-ext-diff", *args]  # plain unified text whatever the user's git config
    pathspec = ["--", rel]
    changed = _git(root, *args, "--name-status", *pathspec).strip()
    untracked = []
    if uncommitted:
        untracked = [f for f in _git(root, "ls-files", "-z", "--others", "--exclude-standard", *pathspec).split("\0")
                     if f]
    if not changed and not untracked:
        raise MagnetarError(f"nothing to review: {what} are empty" + (f" under {rel}" if rel != "." else ""))
    parts = [f"Review {what}" + (f", limited to {rel}" if rel != "." else "") + ". Report findings on the changed "
             "code" + ("." if staged else "; the line numbers of the diff's new side are those of the files you read.")]
    if changed:
        diff = _git(root, *args, *pathspec)
        parts += [f"Changed files (status, path):\n{changed}", f"```diff\n{_budgeted(diff, budget)}```"]
    if untracked:
        parts.append("New untracked files (not in the diff; read them whole):\n" + "\n".join(untracked))
    return utf8_safe("\n\n".join(parts))  # a non-UTF-8 PATH given by the user, shown as the tools show it


def _path_scope(root: Path, target: Path, rel: str) -> str:
    ctx = ToolContext(root=root)  # names as the file tools show them: non-UTF-8 bytes escaped
    if target.is_file():
        files = [relative(ctx, target)]
    else:  # what glob and grep see: git's files (.gitignore honoured), else a walk past build folders
        files = [relative(ctx, p) for p in project_files(ctx, target)]
    if not files:
        raise MagnetarError(f"nothing to review: no files under {rel}")
    shown = "\n".join(files[:MAX_LISTED])
    more = ""
    if len(files) > MAX_LISTED:
        more = f"\n... and {len(files) - MAX_LISTED} more (list them with the file tools)"
    where = "the project" if rel == "." else rel
    return f"Review the code in {where}: {len(files)} file(s), paths relative to the project root:\n{shown}{more}"


# -- the run ----------------------------------------------------------------------------------


def sort_findings(findings: list[dict]) -> list[dict]:
    return sorted(findings, key=lambda f: (-RANK[f["severity"]], f["file"], f["start_line"], f["end_line"],
                                           f["title"]))


def review(engine, root: Path, scope: str, settings: LoopSettings | None = None, *,
           tools: list[Tool] | None = None, on_event=None) -> tuple[list[dict], TurnEnd]:
    """One read-only agent turn over ``scope``; returns the sorted findings and how the turn ended.
    ``tools`` replaces the default read-only tools; ``report_finding`` is always added."""
    ctx = ToolContext(root=root, permissions="read-only", confirm=None)
    toolset = [*(read_only_tools() if tools is None else tools), ReportFinding()]
    agent = Agent(engine, toolset, ctx, load("review"), settings)
    for event in agent.turn(scope):
        if on_event:
            on_event(event)
    return sort_findings(ctx.findings), event  # the turn's last event is its TurnEnd


def exit_code(findings: list[dict], fail_on: str | None) -> int:
    if fail_on is None:
        return 0
    return int(any(RANK[f["severity"]] >= RANK[fail_on] for f in findings))


# -- rendering --------------------------------------------------------------------------------


def _counts(findings: list[dict]) -> dict[str, int]:
    return {s: sum(f["severity"] == s for f in findings) for s in SEVERITIES}


def to_markdown(findings: list[dict], summary: str) -> str:
    counts = _counts(findings)
    lines = ["# Code review", ""]
    if summary.strip():
        lines += [summary.strip(), ""]
    if not findings:
        return "\n".join(lines + ["No findings.", ""])
    lines += [f"**{len(findings)} finding(s):** " + ", ".join(f"{counts[s]} {s}" for s in SEVERITIES), ""]
    for k, f in enumerate(findings, 1):
        span = f"{f['start_line']}" if f["start_line"] == f["end_line"] else f"{f['start_line']}-{f['end_line']}"
        lines += [f"## {k}. [{f['severity']}] {f['title']}", "", f"`{f['file']}:{span}`", "", f["explanation"], ""]
        if f.get("suggested_fix"):
            lines += [f"**Suggested fix:** {f['suggested_fix']}", ""]
    return "\n".join(lines)


def to_json(findings: list[dict], summary: str) -> str:
    body = {"version": 1, "tool": "magnetar", "summary": summary.strip(), "counts": _counts(findings),
            "findings": findings}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def to_sarif(findings: list[dict], root: Path) -> str:
    # The model's titles are free text, so rules are the three severities: stable ids a dashboard can group.
    rules = [{"id": f"review/{s}", "name": f"{s.capitalize()}SeverityFinding",
              "shortDescription": {"text": f"A {s}-severity problem found by magnetar's code review"},
              "defaultConfiguration": {"level": LEVELS[s]}} for s in SEVERITIES]
    results = []
    for f in findings:
        text = f"{f['title']}\n\n{f['explanation']}"
        if f.get("suggested_fix"):
            text += f"\n\nSuggested fix: {f['suggested_fix']}"
        results.append({
            "ruleId": f"review/{f['severity']}", "ruleIndex": SEVERITIES.index(f["severity"]),
            "level": LEVELS[f["severity"]], "message": {"text": text},
            "locations": [{"physicalLocation": {
                "artifactLocation": {"uri": quote(f["file"]), "uriBaseId": "SRCROOT"},
                "region": {"startLine": f["start_line"], "endLine": f["end_line"]}}}]})
    base = root.resolve().as_uri()
    log = {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [{
        "tool": {"driver": {"name": "magnetar", "rules": rules}},
        "originalUriBaseIds": {"SRCROOT": {"uri": base if base.endswith("/") else base + "/"}},
        "results": results}]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


# -- the command ------------------------------------------------------------------------------


def write_report(text: str, output: str | None) -> None:
    """To stdout, or to ``output`` atomically (temp file, fsync, rename): a CI step never reads half a report."""
    if output:
        atomic_write_bytes(output, text.encode())
    else:
        sys.stdout.write(text)


def _progress(event) -> None:
    """What the user watches while a long local review runs (stderr, so stdout stays the report)."""
    if isinstance(event, ToolRunning):
        args = json.dumps(event.arguments, ensure_ascii=False)
        print(f"magnetar review: {event.name} {args[:100]}", file=sys.stderr, flush=True)
    elif isinstance(event, Notice):
        print(f"magnetar review: {event.level}: {event.text}", file=sys.stderr, flush=True)


def run(args) -> int:
    target = Path(args.path).resolve()
    root = project_root(target if target.is_dir() else target.parent)
    # The scope first: an empty diff or a bad path fails before the model loads.
    scope = scope_text(root, target, args.diff, args.staged, args.uncommitted)
    engine = Engine.load(resolve_model(args.model), ctx=args.ctx, **engine_options(args))
    cache = PrefixCache(data_dir() / "kvcache")
    engine.attach_cache(cache)
    settings = LoopSettings(seed=args.seed, temperature=args.temp, max_steps=args.max_steps,
                            max_tokens_per_step=args.max_tokens)
    findings, end = review(engine, root, with_project_instructions(root, scope), settings, on_event=_progress)
    cache.save(engine, "shutdown")
    if args.format == "json":
        text = to_json(findings, end.answer)
    elif args.format == "sarif":
        text = to_sarif(findings, root)
    else:
        text = to_markdown(findings, end.answer)
    write_report(text, args.output)
    if end.reason != "answered":
        print(f"magnetar review: the review stopped without finishing ({end.reason}); "
              f"{len(findings)} finding(s) so far were written", file=sys.stderr)
        return 2
    return exit_code(findings, args.fail_on)
