"""``report_finding``: how the review mode's model hands in one problem it found.

Findings collect in ``ctx.findings``; the review command renders them
as Markdown, JSON or SARIF. The file must exist inside the project and the
line range must lie inside the file, so a report always points somewhere real.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from .base import Tool, ToolContext, ToolRefused, ToolResult, resolve_in_root
from .files import relative

SEVERITIES = ("high", "medium", "low")


class Finding(BaseModel):
    file: str = Field(description="path relative to the project root")
    start_line: int = Field(ge=1, description="first line of the problem (1-based)")
    end_line: int = Field(ge=1, description="last line of the problem (1-based, >= start_line)")
    severity: Literal["high", "medium", "low"] = Field(
        description="high: will break or is exploitable; medium: likely bug or risk; low: worth fixing")
    title: str = Field(min_length=3, max_length=200, description="one line naming the problem")
    explanation: str = Field(min_length=10, description="why it is a problem, referring to the code")
    suggested_fix: str = Field("", description="a concrete change that fixes it")

    @model_validator(mode="after")
    def _ordered(self) -> "Finding":
        if self.end_line < self.start_line:
            raise ValueError("end_line must be >= start_line")
        return self


class ReportFinding(Tool):
    name = "report_finding"
    description = "Report one problem found in the code under review (call once per distinct problem)."
    Args = Finding

    def run(self, args: Finding, ctx: ToolContext) -> ToolResult:
        path = resolve_in_root(ctx, args.file)
        if not path.is_file():
            raise ToolRefused(f"{args.file} is not a file in the project; report findings against existing files")
        with open(path, "rb") as fh:
            n_lines = sum(1 for _ in fh)
        if args.end_line > max(n_lines, 1):
            raise ToolRefused(f"{args.file} has {n_lines} lines; lines {args.start_line}-{args.end_line} are "
                              "outside it")
        rel = relative(ctx, path)  # as listed to the model, so reports name the file the same way
        findings = ctx.findings
        if any(f["file"] == rel and f["start_line"] == args.start_line and f["title"] == args.title
               for f in findings):
            raise ToolRefused("this finding was already reported")
        findings.append({**args.model_dump(), "file": rel})
        return ToolResult(f"recorded finding #{len(findings)}: [{args.severity}] {rel}:{args.start_line} "
                          f"{args.title}", summary=f"{args.severity}: {args.title}")
