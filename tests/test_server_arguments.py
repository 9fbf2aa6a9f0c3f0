"""Tool-call arguments streamed as the model writes them (docs/spec/server-api.md §4.1):
Chat ``tool_calls[].function.arguments`` deltas, Anthropic ``input_json_delta``, Responses
``function_call_arguments.delta``, read with the official clients. The fragments join to
the final ``arguments`` byte for byte, a long value comes in many pieces, typed values
keep their JSON text."""

from __future__ import annotations

import json
from collections import defaultdict

import anthropic
import openai
from scripted_engine import ScriptedEngine
from server_harness import DSML, THINK_END, running

BODY = 'line "one" \\ é\n' * 40 + f"&lt;/{DSML}parameter> end"
SCRIPT = (f"ok{THINK_END}Writing.\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"write_file\">\n"
          f'<{DSML}parameter name="content" string="true">{BODY}</{DSML}parameter>\n'
          f'<{DSML}parameter name="opts" string="false"> {{"mode": [1, 2], "x": "y"}} </{DSML}parameter>\n'
          f'</{DSML}invoke>\n<{DSML}invoke name="read_file">\n'
          f'<{DSML}parameter name="path" string="true">b.py</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>')
WRITE_ARGS = {"content": BODY.replace(f"&lt;/{DSML}", f"</{DSML}"), "opts": {"mode": [1, 2], "x": "y"}}
# The typed value keeps its own JSON text (blanks around it trimmed), strings are escaped.
ARGUMENTS = ['{"content":' + json.dumps(WRITE_ARGS["content"], ensure_ascii=False) + ',"opts":{"mode": [1, 2], "x": "y"}}',
             '{"path":"b.py"}']
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("write_file", "read_file")]
HI = [{"role": "user", "content": "hi"}]


def _check(pieces: dict[int, list[str]]) -> None:
    assert ["".join(pieces[i]) for i in sorted(pieces)] == ARGUMENTS
    assert json.loads("".join(pieces[0])) == WRITE_ARGS
    assert len(pieces[0]) > 5  # the long value arrived as it was written, not in one piece


def test_chat_streams_arguments_as_written(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [SCRIPT, SCRIPT])
    with running(engine) as (url, _):
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        pieces = defaultdict(list)
        for chunk in o.chat.completions.create(model="m", messages=HI, tools=TOOLS, stream=True):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                assert d.function is not None  # the AI SDK's chunk schema wants it on every delta
                pieces[d.index].append(d.function.arguments or "")
        _check(pieces)
        whole = o.chat.completions.create(model="m", messages=HI, tools=TOOLS).choices[0].message
    assert [c.function.arguments for c in whole.tool_calls] == ARGUMENTS  # streamed == not streamed


def test_anthropic_streams_input_json_as_written(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [SCRIPT, SCRIPT])
    with running(engine) as (url, _):
        a = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        tools = [{"name": t["function"]["name"], "input_schema": {"type": "object"}} for t in TOOLS]
        pieces, tool_blocks = defaultdict(list), []
        for ev in a.messages.create(model="m", max_tokens=4096, messages=HI, tools=tools, stream=True):
            if ev.type == "content_block_start" and ev.content_block.type == "tool_use":
                tool_blocks.append(ev.index)
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                pieces[tool_blocks.index(ev.index)].append(ev.delta.partial_json)
        _check(pieces)
        with a.messages.stream(model="m", max_tokens=4096, messages=HI, tools=tools) as s:
            final = s.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [WRITE_ARGS, {"path": "b.py"}]


def test_responses_streams_function_call_arguments_as_written(v4_tokenizer):
    engine = ScriptedEngine(v4_tokenizer, [SCRIPT])
    with running(engine) as (url, _):
        o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        tools = [{"type": "function", **t["function"]} for t in TOOLS]
        pieces, done, added = defaultdict(list), [], {}
        for ev in o.responses.create(model="m", input="hi", tools=tools, stream=True):
            if ev.type == "response.output_item.added" and ev.item.type == "function_call":
                added[ev.output_index] = len(added)
            if ev.type == "response.function_call_arguments.delta":
                pieces[added[ev.output_index]].append(ev.delta)
            if ev.type == "response.output_item.done" and ev.item.type == "function_call":
                done.append(ev.item)
            if ev.type == "response.completed":
                final = ev.response
        _check(pieces)
    assert [i.arguments for i in done] == ARGUMENTS and all(i.status == "completed" for i in done)
    assert [i.arguments for i in final.output if i.type == "function_call"] == ARGUMENTS


def test_arguments_do_not_depend_on_how_the_text_was_split():
    from magnetar.agent.server.arguments import ArgumentsEncoder
    from magnetar.runtime.dsml import DsmlParser

    def encode(pieces) -> list[str]:
        parser, encoder = DsmlParser(thinking=True, stream_arguments=True), ArgumentsEncoder()
        for piece in pieces:
            for ev in parser.feed(piece):
                encoder.fragment(ev)
        for ev in parser.finish():
            encoder.fragment(ev)
        return encoder.calls

    assert encode([SCRIPT]) == encode(list(SCRIPT)) == encode([SCRIPT[i:i + 7] for i in range(0, len(SCRIPT), 7)]) \
        == ARGUMENTS
