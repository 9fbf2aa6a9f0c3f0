"""Compaction against the scripted engine: what the model is asked and where, the new
message list (system kept, one summary message, recent turns verbatim), the files
touched, where the cut may fall, the threshold, the next turn after it, and the
copies of the session kept before it."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from magnetar.agent.compaction import (Compaction, CompactionError, CompactionPolicy, keep_pre_compaction,
                                       needs_compaction, touched_files)
from magnetar.agent.loop import Agent, LoopSettings, ToolRunning
from magnetar.agent.sessions import SessionStore
from magnetar.prompts import load
from magnetar.runtime import chat
from magnetar.tools.base import Tool, ToolContext, ToolRefused, ToolResult
from scripted_engine import ScriptedEngine

D = "｜DSML｜"
SYSTEM = "You are a test."
REQUEST_LINE = load("compaction").splitlines()[0]


def call(name: str, **args) -> str:
    params = "\n".join(
        f'<{D}parameter name="{k}" string="{str(isinstance(v, str)).lower()}">'
        f'{v if isinstance(v, str) else json.dumps(v)}</{D}parameter>' for k, v in args.items())
    return f'<{D}invoke name="{name}">\n{params}\n</{D}invoke>'


def calls(*invokes: str) -> str:
    return "x</think>On it.\n\n" + f"<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def fake(tool_name: str) -> Tool:
    class Fake(Tool):
        name, description = tool_name, "A stand-in: succeeds unless the text is 'fail'."

        class Args(BaseModel):
            path: str = ""
            paths: list[str] = Field(default_factory=list)
            text: str = ""

        def run(self, args, ctx):
            if args.text == "fail":
                raise ToolRefused("refused")
            return ToolResult(f"{tool_name}: done")

    return Fake()


def make(v4_tokenizer, tmp_path, **settings):
    engine = ScriptedEngine(v4_tokenizer, [])
    tools = [fake(n) for n in ("echo", "write_file", "edit_file", "git_commit")]
    return Agent(engine, tools, ToolContext(root=tmp_path), SYSTEM, LoopSettings(**settings)), engine


def run(agent, engine, text: str, *replies: str, queue: str | None = None) -> None:
    engine.replies += replies
    for event in agent.turn(text):
        if queue and isinstance(event, ToolRunning):
            agent.queue(queue)
    assert event.reason == "answered"


def conversation(v4_tokenizer, tmp_path, **settings):
    """Four turns: a write, two edits (one refused), a commit, an echo that also edits."""
    agent, engine = make(v4_tokenizer, tmp_path, **settings)
    run(agent, engine, "create a.py", calls(call("write_file", path="a.py")), "y</think>Created a.py.")
    run(agent, engine, "edit", calls(call("edit_file", path="b.py"), call("edit_file", path="z.py", text="fail"),
                                     call("edit_file", path="a.py")), "y</think>Edited.")
    run(agent, engine, "commit", calls(call("git_commit", paths=["c.py", "a.py"])), "y</think>Committed.")
    run(agent, engine, "last", calls(call("echo", text="hi"), call("edit_file", path="d.py")), "y</think>Said hi.")
    return agent, engine


def test_older_turns_become_one_summary_and_the_recent_turn_stays_verbatim(v4_tokenizer, tmp_path):
    agent, engine = conversation(v4_tokenizer, tmp_path)
    before, live = list(agent.messages), list(engine.tokens)
    recent = before[[m.content for m in before].index("last"):]
    seen = []
    engine.on_token = lambda token: seen.append(list(engine.tokens))
    engine.replies.append("The user wants files; a.py, b.py and c.py were changed.")
    result = agent.compact(CompactionPolicy(keep_turns=1), focus="the commit")

    # Asked once, after the live tokens: only the request was prefilled, opened past </think>.
    asked = v4_tokenizer.decode(engine.prefills[-1])
    assert asked.startswith("<｜User｜>" + REQUEST_LINE)
    assert asked.endswith("Focus on: the commit<｜Assistant｜></think>")
    assert seen[0][:len(live)] == live and len(seen[0]) == len(live) + len(engine.prefills[-1]) + 1
    assert engine.tokens == []  # reset: the next turn renders the compacted conversation

    assert agent.messages[0] == before[0] and agent.messages[0].content == SYSTEM
    assert agent.messages[1] == chat.Message(role="user", content=(
        "Summary of the earlier conversation (compacted):\n\n"
        "The user wants files; a.py, b.py and c.py were changed.\n\n"
        "Files touched so far:\n- a.py\n- b.py\n- c.py"))
    assert agent.messages[2:] == recent
    assert result.files == ["a.py", "b.py", "c.py"]  # the refused edit of z.py is not there
    assert touched_files(agent.messages) == ["a.py", "b.py", "c.py", "d.py"]  # the summary's list carries over
    assert (result.removed_messages, result.kept_messages) == (len(before) - 1 - len(recent), len(recent))
    assert result.tokens_before == len(live) > result.tokens_after_estimate
    assert result.describe().startswith(f"compacted {result.removed_messages} messages into a "
                                        f"{result.summary_tokens}-token summary")
    assert result.describe().endswith("kept the last 1 turn verbatim; files: a.py, b.py, c.py")


def test_after_a_thinking_reply_without_tools_only_the_request_is_prefilled(v4_tokenizer, tmp_path):
    """Without tools the template drops a reply's reasoning once a user turn follows it, so
    re-rendering the conversation no longer matches the live tokens; the request still goes
    after them (the sampled reply is never re-rendered), not into a whole new prefill."""
    engine = ScriptedEngine(v4_tokenizer, [])
    agent = Agent(engine, [], ToolContext(root=tmp_path), SYSTEM, LoopSettings(thinking="think"))
    run(agent, engine, "first", "Thinking about it.</think>Done first.")
    run(agent, engine, "second", "More thought.</think>Done second.")
    live, seen = list(engine.tokens), []
    engine.on_token = lambda token: seen.append(list(engine.tokens))
    engine.replies.append("Two questions were answered.")
    agent.compact(CompactionPolicy(keep_turns=1))
    asked = v4_tokenizer.decode(engine.prefills[-1])  # no BOS: the request alone, after the live tokens
    assert asked.startswith("<｜User｜>" + REQUEST_LINE) and asked.endswith("<｜Assistant｜></think>")
    assert seen[0] == live + engine.prefills[-1] + seen[0][-1:]


def test_the_next_turn_renders_the_compacted_conversation(v4_tokenizer, tmp_path):
    agent, engine = conversation(v4_tokenizer, tmp_path)
    engine.replies.append("Summary: four turns of edits.")
    agent.compact(CompactionPolicy(keep_turns=2))
    run(agent, engine, "go on", "z</think>Going on.")
    prompt = v4_tokenizer.decode(engine.prefills[-1])
    assert prompt.startswith("<｜begin▁of▁sentence｜>" + SYSTEM)
    assert "<｜User｜>Summary of the earlier conversation (compacted):\n\nSummary: four turns of edits." in prompt
    assert prompt.endswith("go on<｜Assistant｜><think>")
    assert engine.tokens == v4_tokenizer.encode_pieces(chat.render(agent.messages, agent.specs).pieces)
    # And a second compaction folds the first summary in, its files kept.
    run(agent, engine, "more", "z</think>More.")
    engine.replies.append("Summary again.")
    assert agent.compact(CompactionPolicy(keep_turns=1)).files == ["a.py", "b.py", "c.py", "d.py"]


def test_nothink_mode(v4_tokenizer, tmp_path):
    agent, engine = make(v4_tokenizer, tmp_path, thinking="nothink")
    run(agent, engine, "one", "One.")
    run(agent, engine, "two", "Two.")
    engine.replies.append("They counted.")
    assert agent.compact(CompactionPolicy(keep_turns=1)).summary == "They counted."
    assert v4_tokenizer.decode(engine.prefills[-1]).endswith(load("compaction")[-30:] + "<｜Assistant｜></think>")
    run(agent, engine, "three", "Three.")
    assert [m.content for m in agent.messages[2:]] == ["two", "Two.", "three", "Three."]


def test_without_room_after_the_live_tokens_the_older_part_is_rendered_alone(v4_tokenizer, tmp_path):
    agent, engine = conversation(v4_tokenizer, tmp_path)
    older = agent.messages[:[m.content for m in agent.messages].index("last")]
    engine.ctx = len(engine.tokens) + 600
    engine.replies.append("Let me reason anyway.</think>Only this counts.")
    result = agent.compact(CompactionPolicy(keep_turns=1, max_summary_tokens=500))
    ask = chat.Message(role="user", content=load("compaction"))
    expected = chat.render([*older, ask], agent.specs).pieces[:-1]
    assert engine.prefills[-1] == v4_tokenizer.encode_pieces(expected) + [v4_tokenizer.token_id("</think>")]
    assert result.summary == "Only this counts."


def test_a_message_queued_during_tools_stays_with_their_results(v4_tokenizer, tmp_path):
    agent, engine = make(v4_tokenizer, tmp_path)
    run(agent, engine, "first", "y</think>One.")
    run(agent, engine, "second", calls(call("echo", text="a")), "y</think>Two.", queue="and also this")
    texts = [m.content for m in agent.messages]
    assert texts.index("and also this") == texts.index("echo: done") + 1
    engine.replies.append("Summary.")
    agent.compact(CompactionPolicy(keep_turns=1))
    kept = agent.messages[2:]
    assert kept[0].content == "second"  # the cut is at the turn, not at the queued message
    ids = {c.id for m in kept for c in m.tool_calls}
    assert all(m.tool_call_id in ids for m in kept if m.role == "tool")


def test_nothing_to_compact_is_an_error_and_changes_nothing(v4_tokenizer, tmp_path):
    agent, engine = make(v4_tokenizer, tmp_path)
    run(agent, engine, "only", calls(call("echo", text="a")), "y</think>Done.")
    before, prefills = list(agent.messages), len(engine.prefills)
    for keep in (1, 2):
        with pytest.raises(CompactionError, match="nothing to compact"):
            agent.compact(CompactionPolicy(keep_turns=keep))
    assert agent.messages == before and len(engine.prefills) == prefills and engine.tokens


def test_an_interrupted_or_empty_summary_leaves_the_conversation_as_it_was(v4_tokenizer, tmp_path):
    agent, engine = conversation(v4_tokenizer, tmp_path)
    before, live = list(agent.messages), list(engine.tokens)
    engine.on_token = lambda token: agent.interrupt()
    engine.replies.append("A summary that is cut short.")
    with pytest.raises(CompactionError, match="interrupted"):
        agent.compact(CompactionPolicy(keep_turns=1))
    engine.on_token = None
    engine.replies.append("  \n")
    with pytest.raises(CompactionError, match="empty summary"):
        agent.compact(CompactionPolicy(keep_turns=1))
    # the live state is rewound, not dropped: the next turn prefills only its own message
    assert agent.messages == before and engine.tokens == live
    run(agent, engine, "still fine?", "y</think>Yes.")
    assert engine.tokens[:len(live)] == live


def test_needs_compaction_at_the_threshold_when_there_is_something_older(v4_tokenizer, tmp_path):
    agent, engine = make(v4_tokenizer, tmp_path)
    run(agent, engine, "one", "y</think>One.")
    policy = CompactionPolicy(keep_turns=1, threshold=0.5)
    engine.ctx = len(engine.tokens) * 2
    assert not needs_compaction(agent, policy)  # at the threshold, but only the kept turn
    run(agent, engine, "two", "y</think>Two.")
    engine.ctx = len(engine.tokens) * 2
    assert needs_compaction(agent, policy)
    engine.ctx += 2
    assert not needs_compaction(agent, policy)


def test_touched_files_in_first_touch_order(v4_tokenizer, tmp_path):
    agent, _ = conversation(v4_tokenizer, tmp_path)
    assert touched_files(agent.messages) == ["a.py", "b.py", "c.py", "d.py"]
    assert touched_files(agent.messages[:1]) == []


def test_describe_without_kept_turns_or_files():
    result = Compaction("s", 12, 0, 9812, 1530, [], 412, 0)
    assert result.describe() == ("compacted 12 messages into a 412-token summary (context 9,812 → about "
                                 "1,530 tokens); kept no turn verbatim")


def test_keep_pre_compaction_copies_the_transcript_and_checkpoint_numbered(tmp_path):
    session = SessionStore(tmp_path / "sessions").create(tmp_path, "model")
    session.append(chat.Message(role="system", content=SYSTEM))
    first = keep_pre_compaction(session.folder)  # never saved: no checkpoint yet
    assert first == session.folder / "transcript.before-compaction-1.jsonl"
    assert first.read_bytes() == session.transcript_path.read_bytes()
    session.checkpoint_path.write_bytes(b"state")
    session.append(chat.Message(role="user", content="more"))
    second = keep_pre_compaction(session.folder)
    assert second.name == "transcript.before-compaction-2.jsonl"
    assert second.read_bytes() == session.transcript_path.read_bytes() != first.read_bytes()
    assert (session.folder / "state.before-compaction-2.ckpt").read_bytes() == b"state"
    assert sorted(p.name for p in session.folder.iterdir()) == [
        "meta.json", "state.before-compaction-2.ckpt", "state.ckpt", "transcript.before-compaction-1.jsonl",
        "transcript.before-compaction-2.jsonl", "transcript.jsonl"]  # no temporary file left
