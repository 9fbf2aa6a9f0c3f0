"""The client side of ``magnetar bench server``: one streaming Chat Completions request
through the official ``openai`` package, timed as a user's client sees it.

It runs in its own process by default (``python -m magnetar.agent.server.bench_client
URL``, one JSON request per stdin line, one JSON result per stdout line), as every real
client does: in the server's process its chunk parsing would take the GIL from the
engine thread between decode steps and the bench would time our server slowed by
its client. ``--client thread`` runs the same code in the bench's process to show that.
"""

from __future__ import annotations

import json
import sys
import time


def connect(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)


def chat(client, body: dict) -> dict:
    """Stream one request. ``ttft_ms``: from just before the request is sent to the first
    chunk that carries generated text (reasoning, content or a tool call); ``decode_s``:
    from that chunk to the last one that does. ``sent_at``, ``first_at``: those instants
    on ``time.perf_counter``, the system's monotonic clock, which the server reads too.
    The reply comes back as a message the conversation can echo (reasoning included, as
    opencode and Pi send it)."""
    sent = time.perf_counter()
    first = last = None
    content, reasoning, calls, usage, finish = [], [], {}, None, None
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        finish = choice.finish_reason or finish
        think = (delta.model_extra or {}).get("reasoning_content")
        if delta.content or think or delta.tool_calls:
            last = time.perf_counter()
            first = first or last
        content.append(delta.content or "")
        reasoning.append(think or "")
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += call.function.name or ""  # every delta has one (spec §6)
            entry["function"]["arguments"] += call.function.arguments or ""
    reply = {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning)}
    if calls:
        reply["tool_calls"] = [calls[k] for k in sorted(calls)]
    return {"sent_at": sent, "first_at": first, "ttft_ms": None if first is None else (first - sent) * 1e3,
            "decode_s": None if first is None else last - first,
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens,
            "completion_tokens": usage.completion_tokens, "finish": finish, "reply": reply}


def floor(client, reps: int) -> dict:
    """The client's own cost: the median round trip of ``GET /v1/models``, which does no
    model work, so the rest of a request's time is the server's and the model's."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        client.models.list()
        times.append((time.perf_counter() - start) * 1e3)
    return {"floor_ms": sorted(times)[len(times) // 2]}


def main() -> int:
    client = connect(sys.argv[1])
    for line in sys.stdin:
        request = json.loads(line)
        try:
            out = floor(client, request["reps"]) if request["op"] == "floor" else chat(client, request["body"])
        except Exception as err:  # reported to the bench, which stops with it
            out = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
