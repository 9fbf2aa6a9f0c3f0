"""The real ``magnetar serve`` app on an ephemeral loopback port, in a thread of the
test process (uvicorn, as users run it), around a scripted or a real engine."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from magnetar.agent.server.app import Server
from magnetar.agent.server.worker import Worker

THINK_END = "</think>"
DSML = "｜DSML｜"
TEXT = f"x{THINK_END}Hello 𝄞 ✓"
TOOL_BLOCK = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="read_file">\n'
              f'<{DSML}parameter name="path" string="true">a "q" \\ é\nb.py</{DSML}parameter>\n'
              f'<{DSML}parameter name="limit" string="false">20</{DSML}parameter>\n'
              f'</{DSML}invoke>\n</{DSML}tool_calls>')
THINK_TOOL = f'Need "the" file.{THINK_END}Reading it.' + TOOL_BLOCK
TOOL_ARGS = {"path": 'a "q" \\ é\nb.py', "limit": 20}
BAD_DSML = f"ok{THINK_END}before\n\n<{DSML}tool_calls>\n<{DSML}nonsense>\n</{DSML}tool_calls>"
LONG = "r" + THINK_END + "word " * 3000


@contextmanager
def running(engine, cache=None, memory_path=None, **settings):
    """Yields (base URL, Server); stops uvicorn (and with it the worker) on exit."""
    server = Server(Worker(engine, cache, memory_path), model_name="tiny", **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
