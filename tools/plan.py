"""``update_plan``: the agent's explicit plan, a checklist the UI shows live.

The whole plan is sent each time (steps in order, each pending, in_progress or
done; at most one in progress), so the latest call is the plan.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .base import Tool, ToolContext, ToolRefused, ToolResult

MARKS = {"pending": "[ ]", "in_progress": "[>]", "done": "[x]"}


class PlanStep(BaseModel):
    step: str = Field(description="what to do, in a few words")
    status: Literal["pending", "in_progress", "done"] = Field(description="pending, in_progress or done")


class UpdatePlan(Tool):
    name = "update_plan"
    description = ("Replace your plan for the task: every step in order with its status. Keep exactly one "
                   "step in_progress while you work; mark steps done as you finish them.")

    class Args(BaseModel):
        steps: list[PlanStep] = Field(description="the whole plan, in order")
        note: str = Field("", description="optional: why the plan changed")

    def run(self, args: Args, ctx: ToolContext) -> ToolResult:
        if not args.steps:
            raise ToolRefused("a plan needs at least one step")
        if sum(s.status == "in_progress" for s in args.steps) > 1:
            raise ToolRefused("only one step can be in_progress at a time")
        ctx.plan = [s.model_dump() for s in args.steps]
        done = sum(s.status == "done" for s in args.steps)
        return ToolResult(f"plan updated ({done}/{len(args.steps)} done):\n{checklist(ctx.plan)}",
                          summary=f"plan: {done}/{len(args.steps)} done")


def checklist(steps: list[dict]) -> str:
    """The plan as the model and the UI show it: one ``[ ]``/``[>]``/``[x]`` line per step."""
    return "\n".join(f"{MARKS[s['status']]} {s['step']}" for s in steps)
