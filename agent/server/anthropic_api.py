"""Anthropic Messages projection (docs/spec/server-api.md §10): ``message_start`` at once,
then one content block open at a time (thinking, text, tool_use), ``message_delta``
with the stop reason and usage, ``message_stop``. Every event has its ``event:`` line
(the anthropic SDK skips events without one)."""

from __future__ import annotations

import json

from .project import Projection, new_id, signature, sse
from .worker import Out

STOP_REASON = {"stop": "end_turn", "stop_sequence": "stop_sequence", "tool_calls": "tool_use",
               "length": "max_tokens", "context": "model_context_window_exceeded", "cancelled": "end_turn"}


def _event(data: dict) -> str:
    return sse(data, data["type"])


def usage(reply) -> dict:
    # input_tokens excludes what came from the cache: clients sum the fields as the context size.
    u = reply.usage
    return {"input_tokens": u["prompt"] - u["cached"], "output_tokens": u["completion"],
            "cache_read_input_tokens": u["cached"], "cache_creation_input_tokens": 0}


class AnthropicProjection(Projection):
    def __init__(self, reply, request):
        super().__init__(reply, request)
        self.id = new_id("msg_")
        self.index = -1
        self.open: str | None = None  # the type of the open block
        self.show_thinking = request.mode != "nothink"
        thinking = request.body.get("thinking")
        self.omit_thinking = isinstance(thinking, dict) and thinking.get("display") == "omitted"

    def opening(self) -> list[str]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.reply.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage(self.reply)}
        return [_event({"type": "message_start", "message": message}), _event({"type": "ping"})]

    def keepalive(self) -> str:
        return _event({"type": "ping"})

    def _start(self, block: dict) -> list[str]:
        events = self._close()
        self.index += 1
        self.open = block["type"]
        return events + [_event({"type": "content_block_start", "index": self.index, "content_block": block})]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": signature(self.reply.reasoning)}))
        self.open = None
        return events + [_event({"type": "content_block_stop", "index": self.index})]

    def _delta(self, delta: dict) -> str:
        return _event({"type": "content_block_delta", "index": self.index, "delta": delta})

    def event(self, out: Out) -> list[str]:
        events: list[str] = []
        if out.kind == "reasoning" and self.show_thinking:
            if self.open != "thinking":
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
            if not self.omit_thinking:
                events.append(self._delta({"type": "thinking_delta", "thinking": out.text}))
        elif out.kind == "text":
            if self.open != "text":
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": out.text}))
        elif out.kind == "tool_start":
            events += self._start({"type": "tool_use", "id": out.call["id"], "name": out.call["name"], "input": {}})
        elif out.kind == "tool_args":
            events.append(self._delta({"type": "input_json_delta", "partial_json": out.text}))
        elif out.kind == "tool":
            events += self._close()
        elif out.kind == "end":
            events += self._end()
        return events

    def _end(self) -> list[str]:
        reply = self.reply
        if reply.finish == "error":
            return [_event({"type": "error", "error": {"type": "api_error", "message": reply.error}})]
        if reply.finish == "cancelled":
            return []
        events = []
        if reply.reasoning and not reply.text and not reply.calls and self.show_thinking:
            events += self._start({"type": "text", "text": ""})  # clients expect text after thinking
        events += self._close()
        delta = {"stop_reason": STOP_REASON[reply.finish], "stop_sequence": reply.stop_sequence}
        return events + [_event({"type": "message_delta", "delta": delta, "usage": usage(reply)}),
                         _event({"type": "message_stop"})]

    def body(self) -> dict:
        reply = self.reply
        content: list[dict] = []
        if reply.reasoning and self.show_thinking:
            content.append({"type": "thinking", "thinking": "" if self.omit_thinking else reply.reasoning,
                            "signature": signature(reply.reasoning)})
        if reply.text or (content and not reply.calls):
            content.append({"type": "text", "text": reply.text})
        content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": json.loads(c["arguments"])}
                    for c in reply.calls]
        return {"id": self.id, "type": "message", "role": "assistant", "model": reply.model, "content": content,
                "stop_reason": STOP_REASON[reply.finish], "stop_sequence": reply.stop_sequence,
                "usage": usage(reply)}
