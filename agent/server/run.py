"""``magnetar serve``: load the model, start the worker and uvicorn, save on exit."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from magnetar.console import load_engine
from magnetar.runtime import PrefixCache, UsageError

from .app import Server
from .worker import Worker

MEMORY_FILE = "tool-memory.json"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_to_stderr() -> None:
    """The server's own lines (each request's prefix reuse and timing, KV cache misses) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("magnetar serve: %(message)s"))
    log = logging.getLogger("magnetar.server")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    if not _loopback(args.host) and not args.api_key:
        # Anyone who can reach the port could run the model and read its replies.
        print(f"magnetar serve: refusing to listen on {args.host} without --api-key", file=sys.stderr)
        return 2
    import uvicorn  # after the check: the refusal must not wait for imports

    from magnetar.agent import models
    path = models.resolve_model(args.model)
    engine = load_engine(args, path)
    if engine is None:  # a rank > 0 of --distributed: it served its layers until rank 0 stopped it
        return 0
    cache = memory = None
    if args.kv_disk_dir:
        if args.kv_disk_space_mb < 1:
            raise UsageError("--kv-disk-space-mb must be positive")
        cache = PrefixCache(args.kv_disk_dir, budget_bytes=args.kv_disk_space_mb << 20)
        memory = Path(args.kv_disk_dir) / MEMORY_FILE
    server = Server(Worker(engine, cache, memory), model_name=Path(path).stem, api_key=args.api_key, cors=args.cors)
    print(f"magnetar serve: {path} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    _log_to_stderr()
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    return 0
