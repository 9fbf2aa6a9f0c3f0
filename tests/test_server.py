"""``magnetar serve`` through the official ``openai`` and ``anthropic`` clients
(docs/spec/server-api.md §13), against the real app on a loopback port: a scripted
engine for exact content (markers as control tokens, a 4-byte character split over
byte tokens), the tiny GGUF for wiring."""

from __future__ import annotations

import json
import logging
import time

import anthropic
import httpx2 as httpx
import openai
import pytest
from scripted_engine import ScriptedEngine
from server_harness import BAD_DSML, LONG, TEXT, THINK_TOOL, TOOL_ARGS, running

from magnetar.runtime import Engine, PrefixCache

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
A_TOOLS = [{"name": "read_file", "description": "Read a file", "input_schema": TOOLS[0]["function"]["parameters"]}]
R_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]
HI = [{"role": "user", "content": "hi"}]


def clients(url, key="local"):
    return (openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0),
            anthropic.Anthropic(base_url=url, api_key=key, max_retries=0))


def test_chat_answers_the_same_content_streamed_and_not(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, TEXT])
    with running(engine) as (url, _):
        o, _ = clients(url)
        r = o.chat.completions.create(model="m", messages=HI)
        assert r.choices[0].message.content == "Hello 𝄞 ✓"
        assert r.choices[0].message.model_extra["reasoning_content"] == "x"
        assert r.choices[0].finish_reason == "stop" and r.model == "m"
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(o.chat.completions.create(model="m", messages=HI, stream=True,
                                                stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello 𝄞 ✓" and all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_tool_call_round_trip_prefills_only_the_new_tokens(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL, TEXT])
    with running(engine) as (url, _):
        o, _ = clients(url)
        chunks = list(o.chat.completions.create(model="m", messages=HI, tools=TOOLS, stream=True))
        calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].id.startswith("call_") and calls[0].function.name == "read_file"
        arguments = "".join(d.function.arguments or "" for d in calls)
        assert json.loads(arguments) == TOOL_ARGS
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
        assert not any("DSML" in (c.choices[0].delta.content or "") for c in chunks if c.choices)
        live = len(engine.tokens)
        history = HI + [{"role": "assistant", "content": "Reading it.", "reasoning_content": 'Need "the" file.',
                         "tool_calls": [{"id": calls[0].id, "type": "function",
                                         "function": {"name": "read_file", "arguments": arguments}}]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": "ok"}]
        r = o.chat.completions.create(model="m", messages=history, tools=TOOLS)
        assert r.usage.prompt_tokens_details.cached_tokens == live  # the live tokens, as sampled
        assert len(engine.prefills[-1]) == r.usage.prompt_tokens - live  # only the tool result and opener
        assert v4_tokenizer.decode(engine.tokens).count(TOOL_ARGS["path"]) == 1
        with pytest.raises(openai.BadRequestError):
            o.chat.completions.create(model="m", messages=HI + [{"role": "tool", "tool_call_id": "call_x",
                                                                 "content": "ok"}])


def test_each_request_logs_what_it_prefilled_and_when_its_first_token_came(v4_tokenizer, caplog):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, TEXT])
    with running(engine) as (url, _), caplog.at_level(logging.INFO, logger="magnetar.server"):
        o, _ = clients(url)
        first = o.chat.completions.create(model="m", messages=HI)
        live = len(engine.tokens)
        history = HI + [{"role": "assistant", "content": first.choices[0].message.content,
                         "reasoning_content": "x"}, {"role": "user", "content": "and then?"}]
        second = o.chat.completions.create(model="m", messages=history)
    logged = [r.request for r in caplog.records if hasattr(r, "request")]
    assert [(t["prompt"], t["reused"], t["prefilled"], t["tokens"], t["finish"]) for t in logged] == [
        (first.usage.prompt_tokens, 0, first.usage.prompt_tokens, first.usage.completion_tokens, "stop"),
        (second.usage.prompt_tokens, live, second.usage.prompt_tokens - live, second.usage.completion_tokens, "stop")]
    for t in logged:  # one clock, in the order a request goes through the server
        assert t["arrived"] <= t["picked"] <= t["synced"] <= t["first"] <= t["ended"]
    assert "prefilled" in caplog.records[-1].getMessage()


def test_bad_dsml_is_plain_text(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [BAD_DSML])
    with running(engine) as (url, _):
        r = clients(url)[0].chat.completions.create(model="m", messages=HI, tools=TOOLS)
    assert r.choices[0].finish_reason == "stop" and "nonsense" in r.choices[0].message.content


def test_stop_strings_and_max_tokens(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, LONG])
    with running(engine) as (url, _):
        o, _ = clients(url)
        r = o.chat.completions.create(model="m", messages=HI, stop=["lo"])
        assert r.choices[0].message.content == "Hel" and r.choices[0].finish_reason == "stop"
        r = o.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert r.choices[0].finish_reason == "length"
    assert engine.tokens[-1] == v4_tokenizer.eos_id  # a cut reply is closed


def test_thinking_toggles_pick_the_prompt_mode(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, ["a", "b", "c", "x</think>d"])
    with running(engine) as (url, _):
        o, _ = clients(url)
        for extra in ({"reasoning_effort": "none"}, {"extra_body": {"thinking": {"type": "disabled"}}},
                      {"model": "deepseek-chat"}):
            o.chat.completions.create(**{"model": "m", "messages": HI, **extra})
            assert engine.prefills[-1][-1] == v4_tokenizer.token_id("</think>")
        o.chat.completions.create(model="m", messages=HI, reasoning_effort="max")
        assert engine.prefills[-1][-1] == v4_tokenizer.token_id("<think>")


def test_anthropic_thinking_text_and_tool_use(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [THINK_TOOL, THINK_TOOL])
    with running(engine) as (url, _):
        _, a = clients(url)
        with a.messages.stream(model="claude-x", max_tokens=256, messages=HI, tools=A_TOOLS,
                               thinking={"type": "enabled", "budget_tokens": 2048}) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
        assert final.content[0].signature.startswith("ds4s1.") and final.content[2].input == TOOL_ARGS
        assert final.stop_reason == "tool_use" and final.model == "claude-x"
        plain = a.messages.create(model="m", max_tokens=256, messages=HI, tools=A_TOOLS)
        assert [b.type for b in plain.content] == ["thinking", "text", "tool_use"]
        assert plain.usage.input_tokens + plain.usage.cache_read_input_tokens > 0
        history = HI + [{"role": "assistant", "content": [c.model_dump() for c in plain.content]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": plain.content[2].id,
                                                      "content": [{"type": "text", "text": "ok"}]}]}]
        counted = a.messages.count_tokens(model="m", messages=history, tools=A_TOOLS).input_tokens
        live = len(engine.tokens)
        engine.replies.append(TEXT)
        after = a.messages.create(model="m", max_tokens=256, messages=history, tools=A_TOOLS).usage
        assert after.cache_read_input_tokens == live  # the echoed turn reuses the sampled tokens
        assert after.input_tokens + after.cache_read_input_tokens == counted
        with pytest.raises(anthropic.BadRequestError) as err:
            a.messages.create(model="m", max_tokens=9, messages=[{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_x", "content": "ok"}]}])
        assert err.value.body["type"] == "error"


def test_responses_items_and_lifecycle(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, THINK_TOOL, TEXT])
    with running(engine) as (url, _):
        o, _ = clients(url)
        r = o.responses.create(model="m", input="hi")
        assert r.output_text == "Hello 𝄞 ✓" and r.status == "completed" and r.usage.total_tokens > 0
        with o.responses.stream(model="m", input="hi", tools=R_TOOLS,
                                reasoning={"effort": "high", "summary": "auto"}) as s:
            final = s.get_final_response()
        assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
        call = final.output[2]
        assert call.call_id.startswith("call_") and json.loads(call.arguments) == TOOL_ARGS
        follow = [{"role": "user", "content": "hi"}] + [i.model_dump(exclude_none=True) for i in final.output] + [
            {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}]
        assert o.responses.create(model="m", input=follow, tools=R_TOOLS).status == "completed"
        with pytest.raises(openai.BadRequestError):
            o.responses.create(model="m", input="hi", previous_response_id="resp_x")


def test_completions_streamed_and_not(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, TEXT])
    with running(engine) as (url, _):
        o, _ = clients(url)
        assert o.completions.create(model="m", prompt="hi").choices[0].text == "Hello 𝄞 ✓"
        raw = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]") and "Hello" in raw


def test_models_errors_and_body_limit(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [])
    with running(engine) as (url, _):
        o, a = clients(url)
        assert [m.id for m in o.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            o.models.retrieve("nope")
        for path, anthropic_shape in (("/v1/chat/completions", False), ("/v1/responses", False),
                                      ("/v1/completions", False), ("/v1/messages?beta=true", True)):
            r = httpx.post(url + path, content=b"{nope")
            assert r.status_code == 400 and (r.json().get("type") == "error") == anthropic_shape
        assert httpx.get(url + "/v1/nope").status_code == 404
        assert httpx.get(url + "/health/").json() == {"status": "ok"}
        big = httpx.post(url + "/v1/messages", content=b" " * ((64 << 20) + 1))
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
        n = a.messages.count_tokens(model="m", messages=HI, tools=A_TOOLS).input_tokens
        assert n == len(engine.render([*map(_msg, HI)], _specs(), "think"))


def _msg(m):
    from magnetar.runtime import Message
    return Message(**m)


def _specs():
    from magnetar.runtime import ToolSpec
    return [ToolSpec(name="read_file", description="Read a file", parameters=A_TOOLS[0]["input_schema"])]


def test_api_key_on_every_route(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [TEXT, TEXT])
    with running(engine, api_key="sekret") as (url, _):
        _, wrong = clients(url, "nope")
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.create(model="m", max_tokens=9, messages=HI)
        assert httpx.get(url + "/health").status_code == 401
        r = httpx.post(url + "/v1/messages?beta=true", headers={"x-api-key": "sekret", "anthropic-version": "2023-06-01",
                                                                "anthropic-beta": "a,b"},
                       json={"model": "m", "max_tokens": 9, "messages": HI})
        assert r.status_code == 200
        o, _ = clients(url, "sekret")
        assert o.chat.completions.create(model="m", messages=HI).choices[0].message.content


def test_disconnect_mid_stream_stops_generation(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [LONG, TEXT])
    with running(engine) as (url, _):
        with httpx.stream("POST", url + "/v1/chat/completions",
                          json={"model": "m", "messages": HI, "stream": True}) as r:
            for k, _line in enumerate(r.iter_lines()):
                if k > 20:
                    break
        o, _ = clients(url)
        r = o.chat.completions.create(model="m", messages=HI, timeout=20)  # the worker is free again
    assert r.choices[0].message.content == "Hello 𝄞 ✓"
    assert v4_tokenizer.decode(engine.tokens).count("word") < 3000


class CachedScriptedEngine(ScriptedEngine):
    identity = {"model": "scripted"}


def test_prefix_reuse_from_disk_after_restart(v4_tokenizer, tmp_path):
    def engine(replies):
        e = CachedScriptedEngine(v4_tokenizer, replies, prefill_chunk=8)
        return e
    first = engine([THINK_TOOL])
    cache = PrefixCache(tmp_path / "kv", min_tokens=8, trim=0)
    with running(first, cache, tmp_path / "memory.json") as (url, _):
        r = clients(url)[0].chat.completions.create(model="m", messages=HI, tools=TOOLS)
    sampled = len(first.tokens)
    message = r.choices[0].message.model_dump(exclude_none=True)
    second = engine([TEXT])
    with running(second, PrefixCache(tmp_path / "kv", min_tokens=8, trim=0), tmp_path / "memory.json") as (url, _):
        r = clients(url)[0].chat.completions.create(model="m", tools=TOOLS, messages=HI + [
            message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "ok"}])
    assert r.usage.prompt_tokens_details.cached_tokens == sampled  # saved at shutdown, restored exactly
    assert second.stats.prefill_tokens == r.usage.prompt_tokens - sampled


def test_tool_memory_is_on_disk_after_each_answer_not_only_at_shutdown(v4_tokenizer, tmp_path):
    memory = tmp_path / "memory.json"
    with running(CachedScriptedEngine(v4_tokenizer, [THINK_TOOL]), None, memory) as (url, _):
        r = clients(url)[0].chat.completions.create(model="m", messages=HI, tools=TOOLS)
        call_id = r.choices[0].message.tool_calls[0].id
        deadline = time.monotonic() + 10  # written by the worker right after the answer went out
        while call_id not in (memory.read_text() if memory.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert call_id in json.loads(memory.read_text())  # a crash now would keep it


def test_tiny_model_wiring(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=512)
    with running(engine) as (url, _):
        o, a = clients(url)
        r = o.chat.completions.create(model="m", messages=HI, max_tokens=6, reasoning_effort="none")
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls") and r.usage.completion_tokens >= 1
        with a.messages.stream(model="m", max_tokens=6, messages=HI) as s:
            assert s.get_final_message().stop_reason in ("max_tokens", "end_turn", "tool_use")
        r2 = o.chat.completions.create(model="m", messages=HI + [
            {"role": "assistant", "content": r.choices[0].message.content or ""},
            {"role": "user", "content": "more"}], max_tokens=4, reasoning_effort="none")
        assert r2.usage.prompt_tokens_details.cached_tokens > 0
