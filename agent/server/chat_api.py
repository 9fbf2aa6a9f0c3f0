"""OpenAI Chat Completions and legacy Completions projections (docs/spec/server-api.md §6, §8)."""

from __future__ import annotations

from .project import Projection, new_id, sse
from .worker import Out

FINISH = {"stop": "stop", "stop_sequence": "stop", "tool_calls": "tool_calls", "length": "length",
          "context": "length", "cancelled": "stop"}


def _usage(reply) -> dict:
    u = reply.usage
    return {"prompt_tokens": u["prompt"], "completion_tokens": u["completion"], "total_tokens": reply.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u["cached"]},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"]}}


class ChatProjection(Projection):
    def __init__(self, reply, request):
        super().__init__(reply, request)
        self.id = new_id("chatcmpl-")
        self.tool_index = -1  # the call whose arguments are streaming

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.reply.created,
                    "model": self.reply.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def event(self, out: Out) -> list[str]:
        if out.kind == "reasoning":
            return [self._chunk({"reasoning_content": out.text})]
        if out.kind == "text":
            return [self._chunk({"content": out.text})]
        # Every tool delta carries a function object (the AI SDK's chunk schema requires it).
        if out.kind == "tool_start":
            self.tool_index += 1
            return [self._chunk({"tool_calls": [{"index": self.tool_index, "id": out.call["id"], "type": "function",
                                                 "function": {"name": out.call["name"], "arguments": ""}}]})]
        if out.kind == "tool_args":
            return [self._chunk({"tool_calls": [{"index": self.tool_index, "function": {"arguments": out.text}}]})]
        if out.kind == "end":
            return self._end()
        return []

    def _end(self) -> list[str]:
        return _stream_end(self, "chat.completion.chunk", lambda finish: self._chunk({}, finish))

    def body(self) -> dict:
        reply = self.reply
        message: dict = {"role": "assistant", "content": reply.text if reply.text or not reply.calls else None}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in reply.calls]
        return {"id": self.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
                "choices": [{"index": 0, "finish_reason": FINISH[reply.finish], "logprobs": None, "message": message}],
                "usage": _usage(reply)}


class CompletionProjection(Projection):
    """Legacy Completions: the answer text only (reasoning never appears in ``text``)."""

    def __init__(self, reply, request):
        super().__init__(reply, request)
        self.id = new_id("cmpl-")

    def _chunk(self, text: str, finish: str | None = None) -> str:
        return sse({"id": self.id, "object": "text_completion", "created": self.reply.created,
                    "model": self.reply.model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]})

    def event(self, out: Out) -> list[str]:
        if out.kind == "text":
            return [self._chunk(out.text)]
        if out.kind != "end":
            return []
        return _stream_end(self, "text_completion", lambda finish: self._chunk("", finish))

    def body(self) -> dict:
        reply = self.reply
        return {"id": self.id, "object": "text_completion", "created": reply.created, "model": reply.model,
                "choices": [{"text": reply.text, "index": 0, "logprobs": None,
                             "finish_reason": FINISH[reply.finish]}], "usage": _usage(reply)}


def _stream_end(view, obj: str, finish_chunk) -> list[str]:
    """How a Chat or Completions stream ends: an error event, nothing (the client left), or the
    finish chunk, the usage chunk when asked for, and ``[DONE]``."""
    reply = view.reply
    if reply.finish == "error":
        return [sse({"error": {"message": reply.error, "type": "server_error"}})]
    if reply.finish == "cancelled":
        return []
    events = [finish_chunk(FINISH[reply.finish])]
    if view.request.include_usage:
        events.append(sse({"id": view.id, "object": obj, "created": reply.created, "model": reply.model,
                           "choices": [], "usage": _usage(reply)}))
    return events + [sse("[DONE]")]
