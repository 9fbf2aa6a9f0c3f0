"""The TUI driven by Textual's Pilot against a scripted engine: a prompt streams a
reply, a tool card appears, the permission modal allows and denies, slash
commands work, and typing while busy queues."""

from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel, Field
from textual.widgets import Collapsible, Markdown, Static

from magnetar.agent.loop import Agent, LoopSettings, Reasoning, Text
from magnetar.agent.tui import ConfirmScreen, MagnetarApp, PlanScreen
from magnetar.runtime.expert_cache import StreamStats
from magnetar.tools.base import Tool, ToolContext, ToolResult
from magnetar.tools.plan import UpdatePlan
from scripted_engine import ScriptedEngine

D = "｜DSML｜"


def write_call(path: str) -> str:
    return (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"touch\">\n<{D}parameter name=\"path\" string=\"true\">"
            f"{path}</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")


class Touch(Tool):
    name, description, access = "touch", "Create an empty file.", "edit"

    class Args(BaseModel):
        path: str = Field(description="file to create")

    def run(self, args, ctx):
        if ctx.permit("edit", "Create a file?", args.path) != "yes":
            return ToolResult("error: the user denied it", ok=False, summary="denied")
        (ctx.root / args.path).write_text("")
        return ToolResult(f"created {args.path}", summary=f"created {args.path}")


def make_app(v4_tokenizer, tmp_path, replies, mode="ask"):
    engine = ScriptedEngine(v4_tokenizer, list(replies))
    agent = Agent(engine, [Touch()], ToolContext(root=tmp_path, permissions=mode), "You are a test.", LoopSettings())
    return MagnetarApp(agent, model_name="scripted"), engine


async def until(pilot, condition, timeout=60.0):  # generous: CI machines can be slow and busy
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    shown = "\n".join(str(w.render()) for w in pilot.app.screen.query(Static))
    raise AssertionError(f"the UI did not get there in time; the screen holds:\n{shown}")


def texts(app) -> str:
    return "\n".join(str(w.render()) for w in app.query(Static))


async def _type(pilot, text):
    await pilot.click("#prompt")
    for ch in text:
        await pilot.press(ch if ch != " " else "space")
    await pilot.press("enter")


def test_a_prompt_streams_the_reply_into_markdown(v4_tokenizer, tmp_path):
    async def go():
        app, _ = make_app(v4_tokenizer, tmp_path, ["Thinking hard.</think>Hello **there**."])
        async with app.run_test() as pilot:
            await _type(pilot, "hi")
            await until(pilot, lambda: not app.busy and app.query(Markdown))
            md = app.query(Markdown).last()
            assert "Hello **there**." in md.source
            assert "Thinking hard." in texts(app)
            assert "ctx" in str(app.query_one("#status", Static).render())
    asyncio.run(go())


def test_the_status_bar_shows_expert_streaming_when_the_engine_streams(v4_tokenizer, tmp_path):
    async def go():
        app, engine = make_app(v4_tokenizer, tmp_path, ["a</think>one", "b</think>two"])
        async with app.run_test() as pilot:
            await _type(pilot, "hi")
            await until(pilot, lambda: not app.busy and app.query(Markdown))
            assert "experts" not in str(app.query_one("#status", Static).render())  # resident: nothing of it
            engine.stats.streaming = StreamStats(uses=40, hits=30, experts_read=10, bytes_read=3 << 20,
                                                 read_seconds=0.002)
            await _type(pilot, "again")
            await until(pilot, lambda: not app.busy and len(app.query(Markdown)) == 2)
            assert "│ experts 75% hit, 3.0 MiB read at 1.57 GB/s │" in str(app.query_one("#status", Static).render())
    asyncio.run(go())


def test_the_modal_allows_then_denies_and_cards_show_results(v4_tokenizer, tmp_path):
    async def go():
        replies = ["a</think>" + write_call("one.txt"), "b</think>made it",
                   "c</think>" + write_call("two.txt"), "d</think>ok, not made"]
        app, _ = make_app(v4_tokenizer, tmp_path, replies)
        async with app.run_test() as pilot:
            await _type(pilot, "make one")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: not app.busy)
            assert (tmp_path / "one.txt").exists()
            assert "touch: ok — created one.txt" in texts(app)
            await _type(pilot, "make two")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.click("#deny")
            await until(pilot, lambda: not app.busy)
            assert not (tmp_path / "two.txt").exists()
            assert "touch: refused — denied" in texts(app)
    asyncio.run(go())


def test_slash_commands(v4_tokenizer, tmp_path):
    async def go():
        app, _ = make_app(v4_tokenizer, tmp_path, ["x</think>" + write_call("y.txt"), "z</think>done"])
        async with app.run_test() as pilot:
            await _type(pilot, "/help")
            assert "/nothink" in texts(app)
            await _type(pilot, "/mode yolo")
            assert app.agent.permissions == "yolo"
            await _type(pilot, "/mode sideways")
            assert "takes one of" in texts(app) and app.agent.permissions == "yolo"
            await _type(pilot, "/nothink")
            assert app.agent.thinking == "nothink"
            await _type(pilot, "/think")
            await _type(pilot, "go")  # yolo: no modal
            await until(pilot, lambda: not app.busy and (tmp_path / "y.txt").exists())
            await _type(pilot, "/bogus")
            assert "unknown command /bogus" in texts(app)
            await _type(pilot, "/new")
            assert len(app.agent.messages) == 1
    asyncio.run(go())


def plan_call(*steps: str) -> str:
    body = json.dumps([{"step": step, "status": "pending"} for step in steps])
    return (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"update_plan\">\n<{D}parameter name=\"steps\" "
            f"string=\"false\">{body}</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")


def test_plan_mode_proposes_then_edits_then_approves(v4_tokenizer, tmp_path):
    async def go():
        replies = ["look</think>" + write_call("early.txt"), "a</think>" + plan_call("make a.txt"),
                   "b</think>Plan: make a.txt.",
                   "c</think>" + plan_call("make a.txt", "make b.txt"), "d</think>Plan revised.",
                   "e</think>" + write_call("a.txt"), "f</think>done"]
        engine = ScriptedEngine(v4_tokenizer, replies)
        agent = Agent(engine, [Touch(), UpdatePlan()], ToolContext(root=tmp_path, permissions="yolo"),
                      "You are a test.", LoopSettings())
        app = MagnetarApp(agent, model_name="scripted")
        async with app.run_test() as pilot:
            await _type(pilot, "/plan add files")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen))
            assert not (tmp_path / "early.txt").exists()  # read-only while planning
            assert "[ ] make a.txt" in str(app.query_one("#plan", Static).render())
            assert "PLAN" in str(app.query_one("#status", Static).render())
            await pilot.press("e")
            await _type(pilot, "also b")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen) and len(app.screen.steps) == 2)
            await pilot.press("a")
            await until(pilot, lambda: not app.busy and (tmp_path / "a.txt").exists())
            assert app.agent.permissions == "yolo" and not app.planning
            prompts = v4_tokenizer.decode([t for ids in engine.prefills for t in ids])
            assert "[Plan mode] Investigate with read-only tools" in prompts and "add files" in prompts
            assert "Revise the plan as follows, then write it again with update_plan: also b" in prompts
            assert "The plan is approved." in prompts
    asyncio.run(go())


def test_a_rejected_plan_changes_nothing(v4_tokenizer, tmp_path):
    async def go():
        engine = ScriptedEngine(v4_tokenizer, ["a</think>" + plan_call("delete everything"), "b</think>Plan."])
        agent = Agent(engine, [Touch(), UpdatePlan()], ToolContext(root=tmp_path, permissions="auto-edit"), "t",
                      LoopSettings())
        app = MagnetarApp(agent, model_name="scripted")
        async with app.run_test() as pilot:
            await _type(pilot, "/plan")
            assert app.agent.permissions == "read-only"
            await _type(pilot, "clean up")
            await until(pilot, lambda: isinstance(app.screen, PlanScreen))
            await pilot.press("r")
            await until(pilot, lambda: not app.planning)
            assert app.agent.permissions == "auto-edit" and "plan rejected" in texts(app)
    asyncio.run(go())


def test_project_instructions_lead_the_first_message_only(v4_tokenizer, tmp_path):
    (tmp_path / "AGENTS.md").write_text("Always answer in French.\n")

    async def go():
        app, engine = make_app(v4_tokenizer, tmp_path, ["a</think>oui", "b</think>encore"])
        async with app.run_test() as pilot:
            await _type(pilot, "hello")
            await until(pilot, lambda: not app.busy and len(app.agent.messages) == 3)
            await _type(pilot, "again")
            await until(pilot, lambda: not app.busy and len(app.agent.messages) == 5)
        users = [m.content for m in app.agent.messages if m.role == "user"]
        assert users[0].startswith("Project instructions (AGENTS.md):\n\nAlways answer in French.")
        assert users[0].endswith("hello") and users[1] == "again"
        assert app.agent.messages[0].content == "You are a test."  # the system prefix never changes
    asyncio.run(go())


def test_reasoning_and_answer_drawn_in_one_batch(v4_tokenizer, tmp_path):
    """Streamed text is drawn in batches: the answer can arrive before the reasoning's
    box is even mounted, and must still collapse it."""
    async def go():
        app, _ = make_app(v4_tokenizer, tmp_path, [])
        async with app.run_test() as pilot:
            app.show_all([Reasoning("weighing it"), Reasoning(" up"), Text("The "), Text("answer.")])
            await pilot.pause()
            box = app.query_one(Collapsible)
            assert box.collapsed and "weighing it up" in texts(app)
            assert app.query(Markdown).last().source == "The answer."
    asyncio.run(go())
