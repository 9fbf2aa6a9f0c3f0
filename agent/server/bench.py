"""``magnetar bench server``: what the HTTP server costs over ``magnetar generate``, and
what prefix reuse saves in an agent conversation (issue 17's benchmark).

One engine, one process, two paths taken in turn (their order swapped every rep, so a
drift in machine load falls on both):

* in-process: what ``magnetar generate`` does (render, prefill, ``Engine.generate``),
  from an empty live state; time to first token from before the render to the first
  token with text;
* server: the real app on an ephemeral loopback port (uvicorn, as ``magnetar serve``
  runs it) with the same engine, asked by the official ``openai`` client streaming Chat
  Completions (in its own process by default, see ``bench_client``); the same prompt,
  greedy, the same token budget, from an empty live state; time to first token from
  just before the request is sent to the first chunk with generated text.

Decode tokens/s on each side: tokens after the first over the time from the first to
the last. The client floor (a ``GET /v1/models`` round trip) says what the client and
HTTP alone cost. Where each time to first token goes comes from the clock both sides
share and the server's per-request log record (worker.py ``_log_request``): to server
(the client building and sending the request, HTTP parsing), waiting (body, prompt
count, the hand-off to the worker), sync (render and prefill, on both paths), first
token (sampling and parsing it), delivery (SSE to the client, which parses it).

Then an agent-style conversation of ``--turns`` turns (system prompt, tools, a task,
then the model's replies echoed back with tool output) goes through the server twice:
continuing the live state (reuse), and with the state emptied before each request
(cold); per turn, the tokens prefilled (usage: prompt - cached) and the time to first
token.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from magnetar.console import engine_options, read_prompt
from magnetar.runtime import Engine, Message, UsageError, atomic_write_bytes

from . import bench_client
from .app import Server
from .loopback import serve_in_thread
from .worker import Worker

PROMPT = ("I am working in a Python repository. The function parse_header in src/wire/parser.py reads "
          "a length-prefixed header, but tests/test_parser.py::test_empty_header fails with an IndexError "
          "when the header has no fields. Explain what the loop that walks the fields does wrong, then "
          "show the corrected function and one more test that would have caught it.")
SYSTEM = ("You are a coding agent working in the user's repository. Use the tools to read files, search "
          "and run commands; make small, verified changes; say what you changed and why.")
TOOLS = [{"type": "function", "function": {
    "name": name, "description": text,
    "parameters": {"type": "object", "properties": {arg: {"type": "string", "description": arg_text}},
                   "required": [arg]}}}
    for name, text, arg, arg_text in (
        ("read_file", "Read a text file of the repository", "path", "path relative to the repository"),
        ("search", "Search the repository with a regular expression", "pattern", "the expression"),
        ("run", "Run a shell command in the repository and return its output", "command", "a bash command"))]
TASK = "tests/test_parser.py::test_empty_header fails. Find the cause and fix it."
TOOL_OUTPUTS = (  # what an agent's tools would answer, one per turn after the first
    "$ python -m pytest -q tests/test_parser.py\n.F..\nFAILED tests/test_parser.py::test_empty_header - "
    "IndexError: list index out of range\n1 failed, 3 passed in 0.12s",
    "src/wire/parser.py\n 1 def parse_header(buf: bytes) -> list[bytes]:\n 2     n = buf[0]\n"
    " 3     fields, at = [], 1\n 4     for i in range(n + 1):\n 5         size = buf[at]\n"
    " 6         fields.append(buf[at + 1:at + 1 + size])\n 7         at += 1 + size\n 8     return fields",
    "tests/test_parser.py:14:def test_empty_header():\ntests/test_parser.py:15:    assert parse_header(b'\\x00') == []",
    "$ python -m pytest -q tests/test_parser.py\n....\n4 passed in 0.10s",
)


PHASES = ("to_server_ms", "wait_ms", "sync_ms", "first_token_ms", "delivery_ms")


@dataclass
class Sample:
    section: str  # overhead, floor or reuse
    rep: int  # the rep, or the conversation's turn
    path: str  # in-process, server, client-floor, server-reuse, server-cold
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    ttft_ms: float = 0.0
    to_server_ms: float = 0.0  # the phases of ttft_ms (they add up to it), see the module docstring
    wait_ms: float = 0.0
    sync_ms: float = 0.0
    first_token_ms: float = 0.0
    delivery_ms: float = 0.0
    decode_tok_s: float = 0.0
    tokens: int = 0


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise UsageError("bench server needs a model", "pass -m MODEL")
    if args.reps < 1 or args.tokens < 2:
        raise UsageError("--reps must be positive and --max-tokens at least 2 (decode needs a second token)")
    if not 1 <= args.turns <= len(TOOL_OUTPUTS) + 1:
        raise UsageError(f"--turns must be between 1 and {len(TOOL_OUTPUTS) + 1}")
    prompt = read_prompt(args.prompt) if args.prompt else PROMPT
    engine = Engine.load(args.model, ctx=args.ctx, **engine_options(args))
    with _serving(engine) as (url, server), _client(url, args.client) as client, _requests_logged() as logged:
        bench = _Bench(engine, server.worker, client, args.tokens, logged)
        samples = bench.overhead(prompt, args.reps) + bench.conversation(args.turns)
    print(render(samples, Path(args.model).name, args))
    if args.csv:
        write_csv(samples, args.csv)
    return 0


class _Bench:
    def __init__(self, engine, worker: Worker, client, max_tokens: int, logged: list[dict]):
        self.engine, self.worker, self.client, self.max_tokens = engine, worker, client, max_tokens
        self.logged = logged  # the server's per-request records, in order

    def overhead(self, prompt: str, reps: int) -> list[Sample]:
        messages = [{"role": "user", "content": prompt}]
        self._in_process(prompt, 0)  # untimed: first calls compile, the client connects
        self._server(messages, "server", 0, reset=True)
        samples = [Sample("floor", 0, "client-floor", ttft_ms=self.client.floor(max(5, reps))["floor_ms"])]
        for rep in range(1, reps + 1):
            pair = [lambda: self._in_process(prompt, rep), lambda: self._server(messages, "server", rep, reset=True)]
            samples += [take() for take in (pair if rep % 2 else pair[::-1])]
        return samples

    def conversation(self, turns: int) -> list[Sample]:
        """The conversation with reuse first (recording each request), then each request
        again from an empty state."""
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        requests, samples = [], []
        self.worker.call(self.engine.reset)
        for turn in range(1, turns + 1):
            requests.append(list(history))
            sample, reply = self._server(history, "server-reuse", turn, reset=False, tools=TOOLS)
            samples.append(sample)
            if turn < turns:
                history = history + [reply] + _tool_turn(reply, TOOL_OUTPUTS[turn - 1])
        for turn, messages in enumerate(requests, 1):
            samples.append(self._server(messages, "server-cold", turn, reset=True, tools=TOOLS)[0])
        return samples

    def _in_process(self, prompt: str, rep: int) -> Sample:
        """``magnetar generate``'s path (agent/generate_command.py), greedy."""
        engine = self.engine
        engine.reset()
        start = time.perf_counter()
        ids = engine.render([Message(role="user", content=prompt)], mode="think")
        engine.prefill(ids)
        prefilled = time.perf_counter()
        seen: list[tuple[int, float]] = []  # (token index, time) of tokens with text
        for count, ev in enumerate(engine.generate(max_tokens=self.max_tokens, temperature=0.0), 1):
            if ev.text:
                seen.append((count, time.perf_counter()))
        (i0, t0), (i1, t1) = seen[0], seen[-1]
        return Sample("overhead", rep, "in-process", len(ids), len(ids), (t0 - start) * 1e3,
                      sync_ms=(prefilled - start) * 1e3, first_token_ms=(t0 - prefilled) * 1e3,
                      decode_tok_s=(i1 - i0) / (t1 - t0) if t1 > t0 else 0.0, tokens=count)

    def _server(self, messages: list[dict], path: str, rep: int, reset: bool, tools: list | None = None):
        if reset:
            self.worker.call(self.engine.reset)  # between jobs, on the worker thread
        body = {"model": "bench", "messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
        if tools:
            body["tools"] = tools
        logged = len(self.logged)
        out = self.client.chat(body)
        if out["ttft_ms"] is None:
            raise UsageError("the server streamed no token", "raise --max-tokens")
        # The stream ends after the worker logs, so its record is in.
        t = self.logged[logged]
        tokens = out["completion_tokens"]
        sample = Sample("overhead" if path == "server" else "reuse", rep, path, out["prompt_tokens"],
                        out["prompt_tokens"] - out["cached_tokens"], out["ttft_ms"],
                        to_server_ms=(t["arrived"] - out["sent_at"]) * 1e3, wait_ms=(t["picked"] - t["arrived"]) * 1e3,
                        sync_ms=(t["synced"] - t["picked"]) * 1e3, first_token_ms=(t["first"] - t["synced"]) * 1e3,
                        delivery_ms=(out["first_at"] - t["first"]) * 1e3,
                        decode_tok_s=(tokens - 1) / out["decode_s"] if out["decode_s"] else 0.0, tokens=tokens)
        return sample if path == "server" else (sample, out["reply"])


def _tool_turn(reply: dict, output: str) -> list[dict]:
    """The agent's next message: the tool results for the reply's calls, or (a reply with
    none, as random weights give) the output as the user's next message."""
    if reply.get("tool_calls"):
        return [{"role": "tool", "tool_call_id": c["id"], "content": output} for c in reply["tool_calls"]]
    return [{"role": "user", "content": f"Tool output:\n{output}"}]


@contextmanager
def _serving(engine):
    """The app around ``engine`` on an ephemeral loopback port, bound as ``magnetar serve`` binds."""
    server = Server(Worker(engine), model_name="bench")
    with serve_in_thread(server.app) as url:
        yield url, server


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.requests: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "request"):
            self.requests.append(record.request)


@contextmanager
def _requests_logged():
    """The server's per-request records, as a list that fills while the bench runs."""
    log, handler = logging.getLogger("magnetar.server"), _Records()
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the records feed the table, not the terminal
    try:
        yield handler.requests
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class _ThreadClient:
    def __init__(self, url: str):
        self.client = bench_client.connect(url)

    def chat(self, body: dict) -> dict:
        return bench_client.chat(self.client, body)

    def floor(self, reps: int) -> dict:
        return bench_client.floor(self.client, reps)


class _ProcessClient:
    def __init__(self, url: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "magnetar.agent.server.bench_client", url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise UsageError("the bench client process ended", "run with --client thread to see why")
        out = json.loads(line)
        if "error" in out:
            raise UsageError(f"the bench client failed: {out['error']}")
        return out

    def chat(self, body: dict) -> dict:
        return self._ask({"op": "chat", "body": body})

    def floor(self, reps: int) -> dict:
        return self._ask({"op": "floor", "reps": reps})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@contextmanager
def _client(url: str, where: str):
    client = _ProcessClient(url) if where == "process" else _ThreadClient(url)
    try:
        yield client
    finally:
        if isinstance(client, _ProcessClient):
            client.close()


def _median(samples: list[Sample], path: str, key: str) -> float:
    return statistics.median(getattr(s, key) for s in samples if s.path == path)


def render(samples: list[Sample], model: str, args: argparse.Namespace) -> str:
    inp = [s for s in samples if s.path == "in-process"]
    floor = next(s.ttft_ms for s in samples if s.path == "client-floor")
    out = io.StringIO()
    out.write(f"server overhead: {model}, prompt {inp[0].prompt_tokens} tokens, up to {args.tokens} tokens greedy, "
              f"{len(inp)} reps interleaved, client in a {args.client}; medians\n")
    out.write(f"{'path':<12}{'TTFT ms':>9}{'to server':>11}{'waiting':>9}{'sync':>9}{'1st token':>11}"
              f"{'delivery':>10}{'decode tok/s':>14}{'tokens':>8}\n")
    for path in ("in-process", "server"):
        out.write(f"{path:<12}{_median(samples, path, 'ttft_ms'):>9.1f}"
                  + "".join(f"{_median(samples, path, k):>{w}.1f}" for k, w in zip(PHASES, (11, 9, 9, 11, 10)))
                  + f"{_median(samples, path, 'decode_tok_s'):>14.2f}{_median(samples, path, 'tokens'):>8.0f}\n")
    ttft = _median(samples, "server", "ttft_ms") / _median(samples, "in-process", "ttft_ms")
    decode = _median(samples, "in-process", "decode_tok_s") / max(_median(samples, "server", "decode_tok_s"), 1e-9)
    outside = {p: statistics.median(s.ttft_ms - s.sync_ms for s in samples if s.path == p)
               for p in ("in-process", "server")}
    out.write(f"ratio server/in-process: TTFT {ttft:.3f}x, time per decoded token {decode:.3f}x (goal <= 1.05x)\n"
              f"outside render+prefill: {outside['server']:.1f} ms through the server, {outside['in-process']:.1f} ms "
              f"in-process; client floor (GET /v1/models round trip): {floor:.1f} ms\n\n")
    out.write(f"prefix reuse: {args.turns}-turn agent conversation (system, {len(TOOLS)} tools, task, replies echoed "
              f"with tool output)\n")
    out.write(f"{'turn':<6}{'prompt':>8}{'prefilled reuse':>17}{'prefilled cold':>16}{'saved':>7}"
              f"{'TTFT reuse ms':>15}{'TTFT cold ms':>14}\n")
    reuse = {s.rep: s for s in samples if s.path == "server-reuse"}
    cold = {s.rep: s for s in samples if s.path == "server-cold"}
    for turn in sorted(reuse):
        r, c = reuse[turn], cold[turn]
        out.write(f"{turn:<6}{r.prompt_tokens:>8}{r.prefilled_tokens:>17}{c.prefilled_tokens:>16}"
                  f"{c.prefilled_tokens - r.prefilled_tokens:>7}{r.ttft_ms:>15.1f}{c.ttft_ms:>14.1f}\n")
    total_r, total_c = (sum(s.prefilled_tokens for s in d.values()) for d in (reuse, cold))
    out.write(f"total prefilled: {total_r} with reuse, {total_c} cold ({1 - total_r / total_c:.0%} saved)\n")
    return out.getvalue().rstrip("\n")


def write_csv(samples: list[Sample], path: str) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[f.name for f in fields(Sample)])
    writer.writeheader()
    writer.writerows(asdict(s) for s in samples)
    atomic_write_bytes(path, text.getvalue().encode())
