"""``magnetar serve``: the loaded model behind OpenAI Chat/Responses/Completions and
Anthropic Messages, so Claude Code, Codex CLI, opencode and the official SDKs work
unmodified (docs/spec/server-api.md).

Why Starlette + uvicorn: both are small, maintained, typed ASGI libraries that the
SDK ecosystem itself is tested against; Starlette gives routing, request bodies and
a ``StreamingResponse`` that cancels its generator when the client goes away (which
is how a disconnect stops generation here), uvicorn gives HTTP/1.1 with chunked
bodies, keep-alive and graceful shutdown. A full framework (FastAPI) would add
schema machinery we do not use: request bodies are validated by hand per protocol
so errors come back in each protocol's own shape.

Rooms: this package sees the model only through ``magnetar.runtime``'s exports.
``worker`` owns the engine (one thread, FIFO), ``inputs`` maps each protocol's body
to runtime messages, ``chat_api``/``responses_api``/``anthropic_api`` project one
generation onto each wire format, ``app`` routes, authenticates and streams.
"""
