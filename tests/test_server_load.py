"""Load on ``magnetar serve``: 50 concurrent clients x 5 requests, mixed protocols,
some streaming, some leaving early, against the scripted engine on loopback. Every
request is answered or cleanly cancelled, the server stays up, memory stays flat."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2 as httpx
import openai
import pytest
from scripted_engine import ScriptedEngine
from server_harness import TEXT, THINK_TOOL, running

CLIENTS, REQUESTS, DEADLINE_S = 50, 5, 120
HI = [{"role": "user", "content": "hi"}]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _one(url: str, client: int, k: int) -> str:
    kind = (client + k) % 5
    o = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0, timeout=DEADLINE_S)
    if kind == 0:
        return o.chat.completions.create(model="m", messages=HI).choices[0].finish_reason
    if kind == 1:
        return [c for c in o.chat.completions.create(model="m", messages=HI, stream=True)][-1].choices[0].finish_reason
    if kind == 2:
        a = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0, timeout=DEADLINE_S)
        with a.messages.stream(model="m", max_tokens=64, messages=HI) as s:
            return s.get_final_message().stop_reason
    if kind == 3:
        return o.responses.create(model="m", input="hi").status
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=DEADLINE_S,
                      json={"model": "m", "messages": HI, "stream": True}) as r:
        next(r.iter_lines())  # the first event, then the client leaves
    return "left"


@pytest.mark.slow  # about a minute on two shared cores
def test_fifty_clients_five_requests_each(v4_tokenizer):
    replies = [TEXT if k % 3 else THINK_TOOL for k in range(2 * CLIENTS * REQUESTS)]
    engine = ScriptedEngine(v4_tokenizer, replies)
    with running(engine) as (url, server):
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            rounds = [pool.submit(lambda c=c: [_one(url, c, k) for k in range(REQUESTS)]) for c in range(CLIENTS)]
            results = [r.result(timeout=DEADLINE_S) for r in rounds]
        warm = _rss_mb()
        with ThreadPoolExecutor(CLIENTS) as pool:
            again = [pool.submit(lambda c=c: [_one(url, c, k) for k in range(REQUESTS)]) for c in range(CLIENTS)]
            results += [r.result(timeout=DEADLINE_S) for r in again]
        elapsed = time.monotonic() - start
        assert httpx.get(url + "/health").json() == {"status": "ok"}
    outcomes = [x for r in results for x in r]
    assert len(outcomes) == 2 * CLIENTS * REQUESTS and elapsed < 2 * DEADLINE_S
    assert set(outcomes) <= {"stop", "tool_calls", "end_turn", "tool_use", "completed", "left", "max_tokens"}
    assert _rss_mb() - warm < 150, "memory grew across the second round"
