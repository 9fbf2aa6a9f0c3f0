"""The app served by uvicorn in a thread on an ephemeral loopback port (the bench, tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from magnetar.runtime import UsageError


@contextmanager
def serve_in_thread(app, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Yields the base URL of ``app`` on 127.0.0.1; stops uvicorn (and the app's lifespan) on exit.

    uvicorn binds the port itself, as ``uvicorn.run(host=, port=)`` in ``magnetar serve``
    does: asyncio then turns Nagle off on each connection (TCP_NODELAY). A listening
    socket made with ``socket.socket()`` has protocol 0, which asyncio does not take for
    TCP, so Nagle stays on, and a response written in two pieces (headers, then body)
    waits for the client's delayed ACK: 40 ms more per request on Linux loopback."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, name="magnetar-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UsageError("the server did not start on a loopback port")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
