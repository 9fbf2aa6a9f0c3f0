"""The real ``magnetar serve`` app on an ephemeral loopback port, in a thread of the
test process (uvicorn, binding as users run it), around a scripted or a real engine."""

from __future__ import annotations

from contextlib import contextmanager

from magnetar.agent.server.app import Server
from magnetar.agent.server.loopback import serve_in_thread
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
    with serve_in_thread(server.app) as url:
        yield url, server
