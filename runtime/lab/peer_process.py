"""A bench peer in a process of its own, so no two engines share a runtime.

In one process our native expert library and llama.cpp shared the system
OpenMP runtime: after our expert step had run, llama.cpp's threads slept at
every barrier (16.4 -> 75-84 ms/token), and torch's and MLX's thread pools
also live per process. ``PeerProcess`` builds the named peer (bench_peers)
in a child Python and drives it over a pipe, one JSON line per call, so each
engine runs with only its own threads. The timings are the child's own
(``decode`` returns its per-token times; ``prefill`` is timed around the
call by the harness, pipe round trip included: well under a millisecond).

Protocol, child side: stdout is the reply channel (anything a library prints
goes to stderr instead); each request line is ``{"op": "prefill", "ids":
[...]}`` or ``{"op": "decode", "n": N}``; each reply is ``{"ok": ...,
"extra": {...}, "tokens": [...], "peak_rss": bytes}`` or ``{"error": "...", "fix":
"..."}`` (``peak_rss``: the child's largest resident set so far, bench_memory.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from ..errors import MagnetarError, UsageError
from .bench_memory import peak_rss
from .bench_peers import make_peers, parse_names


def isolated_peers(names: str | Sequence[str], model_path: str | os.PathLike, *, threads: int = 2,
                   seed: int = 0, ctx: int = 4096,
                   progress: Callable[[str, float], None] | None = None) -> list["PeerProcess"]:
    """``bench_peers.make_peers``, each peer in a process of its own."""
    peers = []
    for name in parse_names(names):
        t0 = time.perf_counter()
        peers.append(PeerProcess(name, model_path, threads=threads, seed=seed, ctx=ctx))
        if progress:
            progress(name, time.perf_counter() - t0)
    return peers


class PeerProcess:
    """The peer ``name`` (see bench_peers.PEERS) for ``model_path``, running in a child process."""

    def __init__(self, name: str, model_path: str | os.PathLike, *, threads: int = 2, seed: int = 0,
                 ctx: int = 4096):
        self.name = name
        args = [sys.executable, "-m", __name__, name, os.fspath(model_path), str(threads), str(seed), str(ctx)]
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self._proc.pid
        hello = self._reply()
        self.detail = f"{hello['detail']} (own process)"
        self.build_seconds = hello["build_seconds"]
        self._extra: dict[str, float] = {}

    def _reply(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise UsageError(f"the {self.name} peer process ended (exit {code})", "its error is printed above")
        msg = json.loads(line)
        if "error" in msg:
            raise UsageError(msg["error"], msg.get("fix"))
        self._extra = msg.get("extra", {})
        self.last_tokens = msg.get("tokens", [])  # the greedy tokens of the last decode
        self.peak_rss = msg.get("peak_rss")  # bytes, as of this reply
        return msg

    def _call(self, request: dict[str, Any]) -> Any:
        self._proc.stdin.write(json.dumps(request) + "\n")
        return self._reply()["ok"]

    def prefill(self, ids: list[int]) -> None:
        self._call({"op": "prefill", "ids": list(ids)})

    def decode(self, n: int) -> list[float]:
        return self._call({"op": "decode", "n": n})

    def extra(self) -> dict[str, float]:
        return dict(self._extra)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy
            pass


def _serve(name: str, path: str, threads: int, seed: int, ctx: int) -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print to stdout must not break the protocol

    def send(msg: dict[str, Any]) -> None:
        replies.write(json.dumps(msg) + "\n")

    try:
        (peer,) = make_peers(name, path, threads=threads, seed=seed, ctx=ctx)
    except MagnetarError as err:
        send({"error": err.message, "fix": err.fix})
        return
    send({"ok": None, "detail": peer.detail, "build_seconds": getattr(peer, "build_seconds", 0.0),
          "peak_rss": peak_rss()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "prefill":
                result = peer.prefill(request["ids"])
            else:
                result = peer.decode(request["n"])
        except MagnetarError as err:
            send({"error": err.message, "fix": err.fix})
            continue
        extra = getattr(peer, "extra", None)
        send({"ok": result, "extra": extra() if callable(extra) else {},
              "tokens": list(getattr(peer, "last_tokens", [])), "peak_rss": peak_rss()})


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
