"""The Textual TUI: the conversation, tool cards, a prefill bar, a status line and
an input box; the agent loop runs in a worker thread so the UI never waits.

Everything the model does arrives as loop events (agent/loop.py) and is drawn
here; nothing in this file talks to the model. A tool that needs permission
blocks its worker thread on ``confirm`` while a modal asks the user.
"""

from __future__ import annotations

import subprocess
import threading
import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Collapsible, Input, Label, Markdown, ProgressBar, Static

from magnetar.console import streaming_summary
from magnetar.runtime import MagnetarError
from magnetar.tools.base import PERMISSIONS
from magnetar.tools.plan import checklist
from magnetar.tools.safegit import run_git

from .compaction import CompactionPolicy, keep_pre_compaction, needs_compaction
from .loop import Agent, Notice, PlanUpdated, Prefill, Reasoning, Text, ToolFinished, ToolRunning, TurnEnd
from .toolset import with_project_instructions

HELP = """Commands:
  /help            this list
  /think /nothink  reason before answering, or answer directly
  /mode MODE       what tools may do without asking: ask, auto-edit, yolo, read-only
  /plan [TASK]     plan mode: the model investigates read-only and proposes a plan
                   for you to approve, edit or reject before anything changes
  /undo            restore the files the last turn changed
  /diff            the repository's uncommitted changes
  /compact [FOCUS] summarize older turns to free context (automatic at 80% full)
  /sessions        saved sessions
  /switch ID       save this session and continue another (its KV state restored)
  /new             start a new conversation
  /quit            leave (Ctrl+Q); Ctrl+C stops the model or a running tool"""

PLAN_MODE = ("[Plan mode] Investigate with read-only tools; change nothing. Then write the plan with "
             "update_plan (every step pending) and explain it briefly. I will approve, edit or reject it "
             "before any change is made.")
PLAN_APPROVED = "The plan is approved. Carry it out step by step, keeping the plan updated with update_plan."


def call_text(name: str, arguments: dict) -> str:
    """A tool call as its card shows it: each argument cut to 200 characters."""
    return f"{name}(" + ", ".join(f"{k}={v!r}"[:200] for k, v in arguments.items()) + ")"


class ConfirmScreen(ModalScreen[bool]):
    """Asks before a write, command or commit: approve or deny."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, title: str, detail: str):
        super().__init__()
        self.title_text, self.detail = title, detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.title_text, id="confirm-title")
            yield Static(self.detail, id="confirm-detail", markup=False)
            with Horizontal():
                yield Button("Allow (y)", variant="success", id="allow")
                yield Button("Deny (n)", variant="error", id="deny")

    def action_answer(self, ok: bool) -> None:
        self.dismiss(ok)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "allow")


class PlanScreen(ModalScreen[str]):
    """The proposed plan: approve (a), edit (e) or reject (r)."""

    BINDINGS = [Binding("a", "answer('approve')", "approve"), Binding("e", "answer('edit')", "edit"),
                Binding("r,escape", "answer('reject')", "reject")]

    def __init__(self, steps: list):
        super().__init__()
        self.steps = steps

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label("The proposed plan", id="confirm-title")
            yield Static(checklist(self.steps), id="plan-steps", markup=False)
            with Horizontal():
                yield Button("Approve (a)", variant="success", id="approve")
                yield Button("Edit (e)", variant="primary", id="edit")
                yield Button("Reject (r)", variant="error", id="reject")

    def action_answer(self, choice: str) -> None:
        self.dismiss(choice)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)


class MagnetarApp(App):
    CSS = """
    #log { height: 1fr; }
    .user { color: $accent; margin: 1 0 0 0; }
    .reasoning { color: $text-muted; }
    .tool { border: round $secondary; padding: 0 1; margin: 0 0 0 2; }
    .notice { color: $warning; }
    #prefill { height: 1; }
    #plan { height: auto; max-height: 12; border: round $secondary; padding: 0 1; }
    #status { height: 1; background: $boost; }
    #confirm { width: 80%; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("ctrl+c", "interrupt", "stop", priority=True), Binding("ctrl+q", "quit", "quit")]

    def __init__(self, agent: Agent, model_name: str = "", live=None):
        """``live``: the ``sessions.LiveSession`` saved after every turn (None: nothing is saved)."""
        super().__init__()
        self.agent, self.model_name, self.live = agent, model_name, live
        self.compaction = CompactionPolicy()
        self.agent.set_confirm(self._confirm)
        self.busy = False
        self.history: list[str] = []
        self._history_at = 0
        self._answer: Markdown | None = None
        self._answer_text = ""
        self._reasoning: Static | None = None
        self._reasoning_box: Collapsible | None = None
        self._reasoning_text = ""
        self._cards: dict[str, Static] = {}
        self.planning = False  # plan mode: read-only turns that end in a plan to approve
        self._permissions_before_plan = agent.permissions
        self._revising = False  # the next message edits the proposed plan

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Static("", id="plan", markup=False)
        yield ProgressBar(id="prefill", show_eta=False)
        yield Static("", id="status")
        yield Input(placeholder="Ask, or /help", id="prompt")

    def on_mount(self) -> None:
        self.query_one("#prefill").display = False
        self.query_one("#plan").display = False
        self._replay_history()
        self._status()
        self.query_one("#prompt").focus()

    def _replay_history(self) -> None:
        """A resumed or switched-to conversation, drawn from its messages."""
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        for message in self.agent.messages[1:]:
            if message.role == "user":
                self._say(message.content, "user")
            elif message.role == "assistant":
                if message.content:
                    log.mount(Markdown(message.content))
                for call in message.tool_calls or []:
                    log.mount(Static(call_text(call.name, call.arguments), classes="tool", markup=False))
        if self.live is not None:
            self._say(f"session {self.live.id}", "notice")

    # -- input ------------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        self.history.append(text)
        self._history_at = len(self.history)
        if text.startswith("/"):
            self.command(text)
        elif self.busy:
            self.agent.queue(text)
            self._say(f"(queued) {text}", "user")
        else:
            self._say(text, "user")
            self.run_turn(self._framed(text))

    def _framed(self, text: str) -> str:
        """What the model gets for a typed message: the project's instructions first in a
        conversation's first message; in plan mode, the plan-mode rules."""
        if self._revising:
            self._revising = False
            return f"[Plan mode] Revise the plan as follows, then write it again with update_plan: {text}"
        if self.planning:
            text = f"{PLAN_MODE}\n\n{text}"
        if len(self.agent.messages) == 1:
            text = with_project_instructions(self.agent.root, text)
        return text

    def on_key(self, event) -> None:
        prompt = self.query_one("#prompt", Input)
        if not prompt.has_focus or event.key not in ("up", "down") or not self.history:
            return
        self._history_at = max(0, min(len(self.history), self._history_at + (-1 if event.key == "up" else 1)))
        prompt.value = self.history[self._history_at] if self._history_at < len(self.history) else ""
        event.stop()

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/help":
            self._say(HELP, "notice")
        elif name in ("/think", "/nothink"):
            self.agent.set_thinking(name[1:])
            self._say(f"mode: {name[1:]}", "notice")
        elif name == "/mode":
            if arg not in PERMISSIONS:
                self._say(f"/mode takes one of: {', '.join(PERMISSIONS)}", "notice")
            else:
                self.agent.set_permissions(arg)
                self._say(f"permissions: {arg}", "notice")
        elif name == "/plan":
            if self.busy:
                self._say("wait for the turn to end (or Ctrl+C) before /plan", "notice")
            elif self.planning and not arg:
                self._leave_plan_mode("left plan mode")
            else:
                self._enter_plan_mode()
                if arg:
                    self._say(arg, "user")
                    self.run_turn(self._framed(arg))
        elif name == "/compact":
            if self.busy:
                self._say("wait for the turn to end (or Ctrl+C) before /compact", "notice")
            else:
                self.compact_conversation(arg or None)
        elif name == "/undo":
            outcome = self.agent.undo_last_turn()
            if outcome is None or not (outcome.restored or outcome.refused):
                self._say("nothing to undo", "notice")
            else:  # files changed after the agent's edit are the user's now: kept, each with why
                lines = ["restored: " + ", ".join(map(str, outcome.restored))] if outcome.restored else []
                self._say("\n".join(lines + [f"not undone: {why}" for _, why in outcome.refused]), "notice")
        elif name == "/diff":
            self._say(_git_diff(self.agent.root), "notice")
        elif name == "/sessions":
            from .sessions import render_list
            listed = self.live.store.all() if self.live is not None else []
            self._say(render_list(listed) + f"\n(this one: {self.live.id})" if listed else "no saved sessions",
                      "notice")
        elif name == "/switch":
            if self.busy or not arg or self.live is None:
                self._say("/switch ID (see /sessions), when no turn is running", "notice")
            else:
                self.switch_session(arg)
        elif name == "/new":
            if self.busy:
                self._say("wait for the turn to end (or Ctrl+C) before /new", "notice")
                return
            self.agent.new_conversation()
            if self.live is not None:
                self.live.save()
                self.live.start(self.agent.root)
            self.query_one("#plan").display = False
            self.query_one("#log").remove_children()
            self._say("new conversation", "notice")
        elif name == "/quit":
            self.exit()
        else:
            self._say(f"unknown command {name}; /help lists them", "notice")
        self._status()

    # -- plan mode --------------------------------------------------------------------------

    def _enter_plan_mode(self) -> None:
        if not self.planning:
            self.planning, self._permissions_before_plan = True, self.agent.permissions
        self.agent.set_permissions("read-only")  # nothing is written or run until the plan is approved
        self.agent.clear_plan()
        self._say("plan mode: the model investigates read-only and proposes a plan (/plan again to leave)",
                  "notice")

    def _leave_plan_mode(self, why: str) -> None:
        self.planning, self._revising = False, False
        self.agent.set_permissions(self._permissions_before_plan)
        self._say(f"{why}; permissions: {self.agent.permissions}", "notice")
        self._status()

    def _plan_decided(self, choice: str | None) -> None:
        if choice == "approve":
            self._leave_plan_mode("plan approved")
            self._say(PLAN_APPROVED, "user")
            self.run_turn(PLAN_APPROVED)
        elif choice == "edit":
            self._revising = True
            prompt = self.query_one("#prompt", Input)
            prompt.placeholder = "How should the plan change?"
            prompt.focus()
        else:
            self._leave_plan_mode("plan rejected")

    def _turn_ended(self) -> None:
        self._set_busy(False)
        self.query_one("#prompt", Input).placeholder = "Ask, or /help"
        steps = self.agent.plan
        if self.planning and steps:
            self.push_screen(PlanScreen(steps), self._plan_decided)

    # -- the turn (worker thread) -----------------------------------------------------------

    @work(thread=True, exclusive=True)
    def run_turn(self, text: str) -> None:
        self.call_from_thread(self._set_busy, True)
        try:
            batch, flushed = [], time.monotonic()
            for event in self.agent.turn(text):
                batch.append(event)
                # streamed text is drawn at most every 50 ms, so drawing never slows the model down
                if not isinstance(event, (Reasoning, Text)) or time.monotonic() - flushed > 0.05:
                    self.call_from_thread(self.show_all, batch)
                    batch, flushed = [], time.monotonic()
            self.call_from_thread(self.show_all, batch)
            if self.live is not None:
                self.live.save()
            if needs_compaction(self.agent, self.compaction):
                self.call_from_thread(self._say, "the context is filling up: compacting older turns", "notice")
                self._compact(None)
        except Exception as err:  # the session must survive a bug; show it, keep the UI
            self.call_from_thread(self._say, f"error: {type(err).__name__}: {err}", "notice")
        finally:
            self.call_from_thread(self._turn_ended)

    @work(thread=True, exclusive=True)
    def compact_conversation(self, focus: str | None) -> None:
        self.call_from_thread(self._set_busy, True)
        try:
            self._compact(focus)
        except MagnetarError as err:  # nothing to compact, interrupted, or an empty summary
            self.call_from_thread(self._say, f"not compacted: {err}", "notice")
        finally:
            self.call_from_thread(self._set_busy, False)

    def _compact(self, focus: str | None) -> None:
        """In the worker: keep the session as it was, then compact and record the result."""
        if self.live is not None:
            self.live.save()
            kept = keep_pre_compaction(self.live.session.folder)
        result = self.agent.compact(self.compaction, focus,
                                    progress=lambda done, total: self.call_from_thread(self.show, Prefill(done, total)))
        if self.live is not None:
            self.live.replaced()
        self.call_from_thread(self._replay_history)
        note = f"; the conversation before is kept in {kept.name}" if self.live is not None else ""
        self.call_from_thread(self._say, result.describe() + note, "notice")

    @work(thread=True, exclusive=True)
    def switch_session(self, prefix: str) -> None:
        self.call_from_thread(self._set_busy, True)
        try:
            how = self.live.switch(prefix, lambda done, total: self.call_from_thread(self.show, Prefill(done, total)),
                                   lambda line: self.call_from_thread(self._say, line, "notice"))
            self.call_from_thread(self._replay_history)
            self.call_from_thread(self._say, f"{how}: {self.agent.context_used} tokens", "notice")
        except Exception as err:  # a bad id or a broken session: say so, stay in this one
            self.call_from_thread(self._say, f"cannot switch: {err}", "notice")
        finally:
            self.call_from_thread(self._set_busy, False)

    def _confirm(self, title: str, detail: str) -> bool:
        """Called from the worker: block it until the user answers the modal."""
        done, answer = threading.Event(), []

        def ask() -> None:
            self.push_screen(ConfirmScreen(title, detail), lambda ok: (answer.append(bool(ok)), done.set()))

        self.call_from_thread(ask)
        done.wait()
        return answer[0]

    def action_interrupt(self) -> None:
        if self.busy:
            self.agent.interrupt()
            self._say("stopping...", "notice")

    # -- drawing ----------------------------------------------------------------------------

    def show_all(self, events: list) -> None:
        """Draw events, merging runs of streamed text into one update."""
        merged: list = []
        for event in events:
            if merged and type(event) is type(merged[-1]) and isinstance(event, (Reasoning, Text)):
                merged[-1] = type(event)(merged[-1].text + event.text)
            else:
                merged.append(event)
        for event in merged:
            self.show(event)

    def show(self, event) -> None:
        log = self.query_one("#log", VerticalScroll)
        if isinstance(event, Prefill):
            bar = self.query_one("#prefill", ProgressBar)
            bar.display = event.done < event.total
            bar.update(total=event.total, progress=event.done)
        elif isinstance(event, Reasoning):
            if self._reasoning is None:
                self._reasoning, self._reasoning_text = Static("", classes="reasoning", markup=False), ""
                self._reasoning_box = Collapsible(self._reasoning, title="reasoning", collapsed=False)
                log.mount(self._reasoning_box)
            self._reasoning_text += event.text
            self._reasoning.update(self._reasoning_text)
        elif isinstance(event, Text):
            self._collapse_reasoning()
            if self._answer is None:  # made with its first text: an update before mounting would be lost
                self._answer_text = event.text
                self._answer = Markdown(self._answer_text)
                log.mount(self._answer)
            else:
                self._answer_text += event.text
                self._answer.update(self._answer_text)
        elif isinstance(event, ToolRunning):
            self._end_message()
            card = Static(call_text(event.name, event.arguments) + "  …", classes="tool", markup=False)
            self._cards[event.call_id] = card
            log.mount(card)
        elif isinstance(event, ToolFinished):
            self._end_message()
            r = event.result
            text = f"{event.name}: {'ok' if r.ok else 'refused'} — {r.summary or r.text.splitlines()[0][:200]}"
            if r.diff:
                text += "\n" + r.diff
            card = self._cards.pop(event.call_id, None)
            if card is None:
                log.mount(Static(text, classes="tool", markup=False))
            else:
                card.update(text)
        elif isinstance(event, PlanUpdated):
            plan = self.query_one("#plan", Static)
            plan.update(checklist(event.steps))
            plan.display = bool(event.steps)
        elif isinstance(event, Notice):
            self._say(event.text, "notice")
        elif isinstance(event, TurnEnd):
            self._end_message()
            if event.reason != "answered":
                self._say(f"turn ended: {event.reason}", "notice")
        log.scroll_end(animate=False)
        self._status()

    def _collapse_reasoning(self) -> None:
        if self._reasoning_box is not None:
            self._reasoning_box.collapsed = True  # held directly: it may not be mounted yet
            self._reasoning, self._reasoning_box = None, None

    def _end_message(self) -> None:
        self._collapse_reasoning()
        self._answer = None

    def _say(self, text: str, kind: str) -> None:
        log = self.query_one("#log", VerticalScroll)
        log.mount(Static(text, classes=kind, markup=False))
        log.scroll_end(animate=False)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.query_one("#prefill").display = False
        self._status()

    def _status(self) -> None:
        s = self.agent.stats
        used, ctx = self.agent.context_used, self.agent.context_size
        pre = getattr(s, "prefill_tok_s", 0.0)
        gen = getattr(s, "generate_tok_s", 0.0)
        state = ("busy" if self.busy else "ready") + (" │ PLAN" if self.planning else "")
        stream = getattr(s, "streaming", None)  # with --expert-cache
        experts = f"{streaming_summary(stream)} │ " if stream else ""
        self.query_one("#status", Static).update(
            f" {state} │ ctx {used}/{ctx} │ prefill {pre:.1f} t/s │ gen {gen:.1f} t/s │ {experts}"
            f"{self.agent.thinking} │ {self.agent.permissions} │ {self.model_name} │ {time.strftime('%H:%M')}")


class FirstRunApp(App):
    """Shown instead of the agent when no model is found: what is missing and how to fix it."""

    BINDINGS = [Binding("q,escape,enter,ctrl+q,ctrl+c", "quit", "quit")]

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(self.text + "\n\nPress q to leave.", markup=False)


def _git_diff(root) -> str:
    try:
        run = run_git(root, "diff", "--stat", "--patch", timeout=30)  # the repository's config runs no program
    except (OSError, subprocess.SubprocessError) as err:
        return f"git diff failed: {err}"
    if run.returncode:
        return run.stderr.decode(errors="replace").strip() or "not a git repository"
    return run.stdout.decode(errors="replace")[:20000] or "no uncommitted changes"
