"""The rest of the §13 plan (docs/spec/server-api.md): keepalives during a long prefill
(§2.4, test 16), a context that fills during generation answered per protocol (§3, test
15), a Codex-shaped Responses request (§7, §12, test 14) and every Chat chunk against
the AI SDK's chunk schema (§6, test 8)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx2 as httpx
import jsonschema
import openai
import pytest
from scripted_engine import ScriptedEngine
from server_harness import DSML, LONG, TEXT, THINK_END, THINK_TOOL, TOOL_ARGS, running

from magnetar.runtime import Message

HI = [{"role": "user", "content": "hi"}]
PREFILL_S, KEEPALIVE_S = 1.2, 0.2
CODEX_REQUEST = json.loads((Path(__file__).parent / "data" / "codex_responses_request.json").read_text())
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]


class SlowPrefillEngine(ScriptedEngine):
    """A cold prefill that takes longer than several keepalive intervals."""

    def sync(self, *args, **kwargs):
        time.sleep(PREFILL_S)
        return super().sync(*args, **kwargs)


def _events(url: str, path: str, body: dict) -> tuple[float, list[str]]:
    """Seconds to the first line, and the raw SSE lines."""
    start, first, lines = time.monotonic(), None, []
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        for line in r.iter_lines():
            first = first or time.monotonic() - start
            lines.append(line)
    return first, lines


def _data(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_keepalives_while_the_prompt_prefills(v4_tokenizer):
    engine = SlowPrefillEngine(v4_tokenizer, [TEXT] * 4)
    with running(engine, keepalive_s=KEEPALIVE_S) as (url, _):
        first, lines = _events(url, "/v1/responses", {"model": "m", "input": "hi", "stream": True})
        kinds = [d["type"] for d in _data(lines)]
        assert first < PREFILL_S and kinds[0] == "response.created"
        before_output = kinds[:kinds.index("response.output_item.added")]
        assert before_output.count("response.in_progress") >= 3  # events, not comments: Codex's idle timer
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        with o.responses.stream(model="m", input="hi") as s:  # the helper accepts the repeats
            assert s.get_final_response().output_text == "Hello 𝄞 ✓"
        first, lines = _events(url, "/v1/chat/completions", {"model": "m", "messages": HI, "stream": True})
        assert first < PREFILL_S and lines.count(": keepalive") >= 3
        first, lines = _events(url, "/v1/messages", {"model": "m", "max_tokens": 64, "messages": HI, "stream": True})
        assert first < PREFILL_S and lines[0] == "event: message_start" and lines.count("event: ping") >= 4


def test_context_full_during_generation_per_protocol(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [LONG] * 4)
    prompt = len(engine.render([Message(role="user", content="hi")], [], "think"))
    engine.ctx = prompt + 12  # the prompt fits; the reply runs into the end of the window
    with running(engine) as (url, _):
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        assert o.chat.completions.create(model="m", messages=HI).choices[0].finish_reason == "length"
        events = list(o.responses.create(model="m", input="hi", max_output_tokens=1000, stream=True))
        assert events[-1].type == "response.failed"
        assert events[-1].response.error.code == "context_length_exceeded"  # Codex compacts on it
        a = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        assert a.messages.create(model="m", max_tokens=1000, messages=HI).stop_reason == "model_context_window_exceeded"
        # A client's own max_tokens below the free context is still "length" / "incomplete".
        assert o.responses.create(model="m", input="hi", max_output_tokens=3).status == "incomplete"
    assert len(engine.tokens) <= engine.ctx


def _codex_item_ok(item: dict) -> bool:
    """What Codex needs to deserialize an output_item.done item (spec §7.1)."""
    if item["type"] == "reasoning":
        return isinstance(item.get("id"), str) and isinstance(item.get("summary"), list)
    if item["type"] == "function_call":
        return all(isinstance(item.get(k), str) for k in ("name", "call_id", "arguments"))
    return item["type"] == "message" and item.get("role") == "assistant" and isinstance(item.get("content"), list)


def test_a_codex_request_gets_what_codex_reads(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL])
    with running(engine) as (url, _):
        headers = {"Authorization": "Bearer local", "originator": "codex_cli_rs", "session_id": "s1",
                   "Accept": "text/event-stream", "User-Agent": "codex_cli_rs/0.145.0"}
        with httpx.stream("POST", url + "/v1/responses", json=CODEX_REQUEST, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            events = _data(list(r.iter_lines()))
    assert events[0]["type"] == "response.created" and events[0]["response"]["id"].startswith("resp_")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done and all(_codex_item_ok(i) for i in done)
    assert json.loads(next(i for i in done if i["type"] == "function_call")["arguments"]) == TOOL_ARGS
    last = events[-1]
    assert last["type"] == "response.completed" and last["response"]["id"] == events[0]["response"]["id"]
    usage = last["response"]["usage"]
    assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert sum(e["type"] in ("response.completed", "response.incomplete", "response.failed") for e in events) == 1
    prompt = v4_tokenizer.decode(engine.prefills[0])
    assert "You are Codex" in prompt and "Filesystem sandboxing" in prompt and "list files" in prompt


# The AI SDK's openai-compatible chat chunk schema (vercel/ai packages/openai-compatible,
# chunkBaseSchema | error), restated as JSON Schema: "nullish" = absent or null.
def _nullish(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STR, _NUM = {"type": "string"}, {"type": "number"}
_TOOL_DELTA = {"type": "object", "required": ["function"], "properties": {
    "index": _nullish(_NUM), "id": _nullish(_STR),
    "function": {"type": "object", "properties": {"name": _nullish(_STR), "arguments": _nullish(_STR)}}}}
_CHUNK = {"type": "object", "required": ["choices"], "properties": {
    "id": _nullish(_STR), "created": _nullish(_NUM), "model": _nullish(_STR),
    "choices": {"type": "array", "items": {"type": "object", "properties": {
        "delta": _nullish({"type": "object", "properties": {
            "role": _nullish({"enum": ["assistant", ""]}), "content": _nullish(_STR),
            "reasoning_content": _nullish(_STR), "reasoning": _nullish(_STR),
            "tool_calls": _nullish({"type": "array", "items": _TOOL_DELTA})}}),
        "finish_reason": _nullish(_STR)}}},
    "usage": _nullish({"type": "object", "properties": {
        k: _nullish(_NUM) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}})}}
_ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["message"], "properties": {"message": _STR}}}}
AI_SDK_CHUNK = {"anyOf": [_CHUNK, _ERROR]}


def test_every_chat_chunk_fits_the_ai_sdk_schema(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL, TEXT])
    with running(engine) as (url, _):
        chunks = []
        for script_tools in (TOOLS, None):
            body = {"model": "m", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
            _, lines = _events(url, "/v1/chat/completions", {**body, "tools": script_tools} if script_tools else body)
            assert [line for line in lines if line][-1] == "data: [DONE]"
            chunks += _data(lines)
    for chunk in chunks:
        jsonschema.validate(chunk, AI_SDK_CHUNK)
    tool_deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls", [])]
    assert len(tool_deltas) > 1 and all("function" in d for d in tool_deltas)


def test_echoed_turns_without_reasoning_render_as_sampled(v4_tokenizer, caplog):
    """§4.3: clients drop reasoning (opencode's reasoning_content, Codex's include:[]); the
    server fills it from memory by tool-call id, or by the visible transcript for a text
    reply, so the prompt is what the model sampled even when the live state moved on to
    another conversation (then the disk cache can match it); otherwise it renders without."""
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL, TEXT, TEXT, TEXT, TEXT])
    with running(engine) as (url, _):
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        first = o.chat.completions.create(model="m", messages=HI, tools=TOOLS).choices[0].message
        call = first.tool_calls[0]
        history = HI + [{"role": "assistant", "content": first.content, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "ok"}]
        second = o.chat.completions.create(model="m", messages=history, tools=TOOLS)
        sampled = v4_tokenizer.decode(engine.tokens)
        o.chat.completions.create(model="m", messages=[{"role": "user", "content": "another conversation"}])
        history += [{"role": "assistant", "content": second.choices[0].message.content},
                    {"role": "user", "content": "more"}]
        o.chat.completions.create(model="m", messages=history, tools=TOOLS)
        rendered = v4_tokenizer.decode(engine.prefills[-1])  # the whole prompt: the live state held the other one
        assert rendered.startswith(sampled)  # both replies as sampled, reasoning included
        strange = HI + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_elsewhere", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_elsewhere", "content": "ok"}]
        with caplog.at_level("INFO", logger="magnetar.server"):
            answer = o.chat.completions.create(model="m", messages=strange, tools=TOOLS)
        assert answer.choices[0].finish_reason == "stop"  # 200, not 400
    assert any("KV cache miss" in r.message for r in caplog.records)


CALL_REST = (f'<{DSML}parameter name="path" string="true">a.py</{DSML}parameter>\n</{DSML}invoke>\n'
             f'</{DSML}tool_calls>')
HEADER = f'<{DSML}invoke name="read_file">\n'


def test_tool_choice_required_or_forced_opens_the_call(v4_tokenizer):
    """§6, §14: required / a named tool make the reply open the call right after the
    reasoning (the DSML is written into the reply, then the model goes on), not auto."""
    engine = ScriptedEngine(v4_tokenizer, ["Need it." + THINK_END, HEADER + CALL_REST, CALL_REST, CALL_REST, CALL_REST])
    with running(engine) as (url, _):
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        r = o.chat.completions.create(model="m", messages=HI, tools=TOOLS, tool_choice="required")
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.model_extra["reasoning_content"] == "Need it."
        assert json.loads(message.tool_calls[0].function.arguments) == {"path": "a.py"}
        assert v4_tokenizer.decode(engine.prefills[-1]) == f"\n\n<{DSML}tool_calls>\n"  # written after </think>
        named = {"type": "function", "function": {"name": "read_file"}}
        r = o.chat.completions.create(model="m", messages=HI, tools=TOOLS, tool_choice=named, reasoning_effort="none")
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"path": "a.py"}
        assert v4_tokenizer.decode(engine.prefills[-1]).endswith(HEADER)
        a = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        m = a.messages.create(model="m", max_tokens=99, messages=HI, thinking={"type": "disabled"},
                              tools=[{"name": "read_file", "input_schema": {"type": "object"}}],
                              tool_choice={"type": "tool", "name": "read_file"})
        assert m.stop_reason == "tool_use" and m.content[-1].input == {"path": "a.py"}
        r = o.responses.create(model="m", input="hi", reasoning={"effort": "none"},
                               tools=[{"type": "function", **TOOLS[0]["function"]}],
                               tool_choice={"type": "function", "name": "read_file"})
        assert [i.type for i in r.output] == ["function_call"] and r.output[0].name == "read_file"
        for bad in ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                    {"tool_choice": "required"}):
            with pytest.raises(openai.BadRequestError):
                o.chat.completions.create(model="m", messages=HI, **bad)
