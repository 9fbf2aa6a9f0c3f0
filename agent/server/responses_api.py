"""OpenAI Responses projection (docs/spec/server-api.md §7): ``response.created`` first,
numbered events, every item added before its deltas and done with the same identity,
exactly one terminal event (completed, incomplete or failed) listing every item."""

from __future__ import annotations

from .project import Projection, new_id, sse
from .worker import Out


class ResponsesProjection(Projection):
    def __init__(self, reply, request):
        super().__init__(reply, request)
        self.id = new_id("resp_")
        self.seq = 0
        self.items: list[dict] = []  # done items, in output order
        self.open: dict | None = None  # the reasoning or message item being streamed
        reasoning = request.body.get("reasoning")
        # Reasoning text goes on the wire only when the client asks for a summary (§7.2).
        self.show_reasoning = isinstance(reasoning, dict) and bool(reasoning.get("summary"))

    def _event(self, kind: str, **data) -> str:
        event = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse(event, kind)

    def response(self, status: str) -> dict:
        body = self.request.body
        out = {"id": self.id, "object": "response", "created_at": self.reply.created, "status": status,
               "model": self.reply.model, "output": list(self.items), "parallel_tool_calls": True,
               "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
               "error": None, "incomplete_details": None}
        if status != "in_progress":
            out["usage"] = self._usage()
        return out

    def _usage(self) -> dict:
        u = self.reply.usage
        return {"input_tokens": u["prompt"], "input_tokens_details": {"cached_tokens": u["cached"]},
                "output_tokens": u["completion"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                "total_tokens": self.reply.total_tokens}

    def opening(self) -> list[str]:
        return [self._event("response.created", response=self.response("in_progress"))]

    def keepalive(self) -> str:
        # Codex's idle timer counts events, not comments (§2.4).
        return self._event("response.in_progress", response=self.response("in_progress"))

    def event(self, out: Out) -> list[str]:
        if out.kind == "reasoning" and self.show_reasoning:
            return self._reasoning(out.text)
        if out.kind == "text":
            return self._text(out.text)
        if out.kind == "tool_start":
            return self._tool_start(out.call)
        if out.kind == "tool_args":
            self.open["arguments"] += out.text
            return [self._event("response.function_call_arguments.delta", **self._where(), delta=out.text)]
        if out.kind == "tool":  # the block is valid; a call before the last one is done already
            return self._tool_done() if self.open and self.open.get("call_id") == out.call["id"] else []
        if out.kind == "end":
            return self._end()
        return []

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items)}

    def _reasoning(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "reasoning":
            events += self._close()
            self.open = {"id": new_id("rs_"), "type": "reasoning", "status": "in_progress", "summary": [], "text": ""}
            events.append(self._event("response.output_item.added", output_index=len(self.items),
                                      item=self._item(self.open)))
            events.append(self._event("response.reasoning_summary_part.added", **self._where(), summary_index=0,
                                      part={"type": "summary_text", "text": ""}))
        self.open["text"] += text
        return events + [self._event("response.reasoning_summary_text.delta", **self._where(), summary_index=0,
                                     delta=text)]

    def _text(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self._close()
            self.open = {"id": new_id("msg_"), "type": "message", "status": "in_progress", "text": ""}
            events.append(self._event("response.output_item.added", output_index=len(self.items),
                                      item=self._item(self.open)))
            events.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": []}))
        self.open["text"] += text
        return events + [self._event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                     logprobs=[])]

    def _item(self, item: dict, status: str = "in_progress") -> dict:
        text = item["text"] if status == "completed" else ""
        if item["type"] == "reasoning":
            summary = [{"type": "summary_text", "text": text}] if status == "completed" else []
            return {"id": item["id"], "type": "reasoning", "status": status, "summary": summary}
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"id": item["id"], "type": "message", "status": status, "role": "assistant", "content": content}

    def _close(self, tool_status: str = "incomplete") -> list[str]:
        if self.open is not None and self.open["type"] == "function_call":
            # Otherwise than by the next call: its block turned out malformed (§3: then it is text).
            return self._tool_done(tool_status)
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.items)}
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": item["text"]}
            events = [self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=item["text"]),
                      self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part)]
        else:
            part = {"type": "output_text", "text": item["text"], "annotations": []}
            events = [self._event("response.output_text.done", **where, content_index=0, text=item["text"],
                                  logprobs=[]),
                      self._event("response.content_part.done", **where, content_index=0, part=part)]
        done = self._item(item, "completed")
        events.append(self._event("response.output_item.done", output_index=len(self.items), item=done))
        self.items.append(done)
        return events

    def _tool_start(self, call: dict) -> list[str]:
        events = self._close(tool_status="completed")  # the previous invoke has closed
        self.open = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress", "name": call["name"],
                     "call_id": call["id"], "arguments": ""}
        return events + [self._event("response.output_item.added", output_index=len(self.items),
                                     item={**self.open, "arguments": ""})]

    def _tool_done(self, status: str = "completed") -> list[str]:
        item, self.open = self.open, None
        index = len(self.items)
        events = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=item["arguments"])]
        done = {**item, "status": status}
        events.append(self._event("response.output_item.done", output_index=index, item=done))
        self.items.append(done)
        return events

    def _end(self) -> list[str]:
        reply = self.reply
        if reply.finish == "cancelled":
            return []
        events = self._close()
        response = self.final()
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(response["status"],
                                                                                              "response.failed")
        return events + [self._event(kind, response=response)]

    def final(self) -> dict:
        reply = self.reply
        status = {"length": "incomplete", "context": "failed", "error": "failed"}.get(reply.finish, "completed")
        response = self.response(status)
        if reply.finish == "length":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        elif reply.finish == "context":
            response["error"] = {"code": "context_length_exceeded", "message": "the context window is full"}
        elif reply.finish == "error":
            response["error"] = {"code": "server_error", "message": reply.error}
        return response

    def body(self) -> dict:
        # Non-streaming: the same items the stream would have produced.
        for out in self._replay():
            self.event(out)
        return self.final()

    def _replay(self) -> list[Out]:
        reply = self.reply
        outs = [Out("reasoning", reply.reasoning)] if reply.reasoning else []
        outs += [Out("text", reply.text)] if reply.text else []
        for c in reply.calls:
            outs += [Out("tool_start", call=c), Out("tool_args", c["arguments"]), Out("tool", call=c)]
        return outs + [Out("end")]
