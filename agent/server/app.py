"""The HTTP surface (docs/spec/server-api.md §1, §2, §11): routing on the path alone
(query stripped, one trailing slash tolerated), the API key on every route, the body
cap, errors in each protocol's shape, and the streaming loop with keepalives."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from magnetar.runtime import ChatError

from . import inputs
from .anthropic_api import AnthropicProjection
from .chat_api import ChatProjection, CompletionProjection
from .project import Reply, new_id
from .responses_api import ResponsesProjection
from .worker import Job, Worker, count_prompt

BODY_LIMIT = 64 << 20
KEEPALIVE_S = 5.0
MODEL_CREATED = 1767225600
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 500: "api_error", 503: "overloaded_error"}


def error_response(err: HttpError, anthropic: bool) -> JSONResponse:
    # Deterministic server errors: the SDKs would otherwise re-run a failing prompt.
    headers = {"x-should-retry": "false"} if err.status >= 500 else None
    if anthropic:
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(err.status, "api_error"), "message": err.message},
                "request_id": new_id("req_")}
    else:
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=headers)


@dataclass(frozen=True)
class Endpoint:
    methods: tuple[str, ...]
    handler: str
    anthropic: bool = False


ENDPOINTS = {
    "/health": Endpoint(("GET",), "health"),
    "/v1/models": Endpoint(("GET",), "models"),
    "/v1/chat/completions": Endpoint(("POST",), "chat"),
    "/v1/completions": Endpoint(("POST",), "completions"),
    "/v1/responses": Endpoint(("POST",), "responses"),
    "/v1/messages": Endpoint(("POST",), "messages", anthropic=True),
    "/v1/messages/count_tokens": Endpoint(("POST",), "count_tokens", anthropic=True),
}

GENERATORS = {  # handler -> (body parser, projection, tool-call id prefix)
    "chat": (inputs.chat_request, ChatProjection, "call_"),
    "completions": (inputs.completion_request, CompletionProjection, "call_"),
    "responses": (inputs.responses_request, ResponsesProjection, "call_"),
    "messages": (inputs.anthropic_request, AnthropicProjection, "toolu_"),
}


@dataclass
class Server:
    """The ASGI app around one worker. ``model_name``: the id /v1/models lists."""

    worker: Worker
    model_name: str = "deepseek-v4-flash"
    api_key: str | None = None
    cors: str | None = None
    keepalive_s: float = KEEPALIVE_S
    app: Starlette = field(init=False)

    def __post_init__(self) -> None:
        @asynccontextmanager
        async def lifespan(app):
            yield
            await anyio.to_thread.run_sync(self.worker.stop)

        self.app = Starlette(routes=[Route("/{path:path}", self.dispatch, methods=["GET", "POST", "OPTIONS",
                                                                                   "PUT", "DELETE", "PATCH"])],
                             lifespan=lifespan)

    async def dispatch(self, request: Request) -> Response:
        path = request.url.path
        path = path[:-1] if path.endswith("/") and len(path) > 1 else path
        model_id = path.removeprefix("/v1/models/") if path.startswith("/v1/models/") else None
        endpoint = ENDPOINTS.get("/v1/models" if model_id else path)
        anthropic = endpoint.anthropic if endpoint else "anthropic-version" in request.headers
        try:
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=self._cors())
            self._authorize(request)
            if endpoint is None:
                raise HttpError(404, f"unknown path {path}", code="unknown_url")
            if request.method not in endpoint.methods:
                raise HttpError(405, f"{request.method} is not allowed on {path}")
            response = await self._handle(endpoint.handler, request, model_id)
        except HttpError as err:
            response = error_response(err, anthropic)
        response.headers.update(self._cors())
        return response

    def _cors(self) -> dict:
        if not self.cors:
            return {}
        return {"Access-Control-Allow-Origin": self.cors, "Access-Control-Allow-Headers": "*",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS"}

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return  # loopback default: any or no credential
        bearer = request.headers.get("authorization", "")
        given = [bearer[7:] if bearer.lower().startswith("bearer ") else "", request.headers.get("x-api-key", "")]
        if not any(secrets.compare_digest(g.encode(), self.api_key.encode()) for g in given if g):
            raise HttpError(401, "invalid API key", code="invalid_api_key")

    async def _handle(self, handler: str, request: Request, model_id: str | None) -> Response:
        arrived = time.perf_counter()
        if handler == "health":
            return JSONResponse({"status": "ok"})
        if handler == "models":
            return self._models(request, model_id)
        body = await _read_json(request)
        if handler == "count_tokens":
            parsed = _parse(inputs.anthropic_request, body)
            return JSONResponse({"input_tokens": await self._count(parsed)})
        parse, projection, prefix = GENERATORS[handler]
        parsed = _parse(parse, body)
        prompt = await self._count(parsed)
        if prompt >= self.worker.engine.ctx:
            raise _too_long(prompt, self.worker.engine.ctx, handler)
        job = Job(parsed.messages, parsed.tools, parsed.mode, parsed.max_tokens, parsed.sampling, prefix, parsed.stop,
                  parsed.force_call, arrived)
        view = projection(Reply(parsed.model), parsed)
        self.worker.submit(job)
        if parsed.stream:
            return StreamingResponse(self._stream(job, view), media_type="text/event-stream", headers=SSE_HEADERS)
        return await self._collect(job, view, request)

    async def _count(self, parsed: inputs.Request) -> int:
        # Exact replay of sampled tool calls, and their reasoning where the client dropped it (§4.3).
        parsed.messages = self.worker.memory.apply(parsed.messages, thinking=parsed.mode != "nothink")
        try:
            return await anyio.to_thread.run_sync(count_prompt, self.worker.engine, parsed.messages, parsed.tools,
                                                  parsed.mode)
        except ChatError as err:  # e.g. a tool result for an unknown call id
            raise HttpError(400, f"{err.message}; replay full history", param="messages") from None

    def _models(self, request: Request, model_id: str | None) -> Response:
        if model_id is not None and model_id != self.model_name:
            raise HttpError(404, f"model {model_id!r} not found", code="model_not_found")
        ctx = self.worker.engine.ctx
        entry = {"id": self.model_name, "object": "model", "created": MODEL_CREATED, "owned_by": "magnetar",
                 "context_length": ctx, "top_provider": {"context_length": ctx, "max_completion_tokens": ctx}}
        if model_id is not None:
            return JSONResponse(entry)
        if "anthropic-version" in request.headers:
            data = [{"type": "model", "id": self.model_name, "display_name": self.model_name,
                     "created_at": "2026-01-01T00:00:00Z"}]
            return JSONResponse({"data": data, "has_more": False, "first_id": self.model_name,
                                 "last_id": self.model_name})
        return JSONResponse({"object": "list", "data": [entry]})

    async def _next(self, job: Job):
        """The job's next event, or None after ``keepalive_s`` without one."""
        try:
            return await asyncio.wait_for(job.out.get(), self.keepalive_s)
        except TimeoutError:
            return None

    async def _stream(self, job: Job, view):
        finished = False
        try:
            for text in view.opening():
                yield text
            while True:
                out = await self._next(job)
                if out is None:
                    yield view.keepalive()
                    continue
                view.reply.add(out)
                for text in view.event(out):
                    yield text
                if out.kind == "end":
                    finished = True
                    return
        finally:
            if not finished:  # the client went away: stop generating, free the worker
                job.cancelled.set()

    async def _collect(self, job: Job, view, request: Request) -> Response:
        try:
            while True:
                out = await self._next(job)
                if out is None:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return Response(status_code=499)
                    continue
                view.reply.add(out)
                if out.kind == "end":
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if view.reply.finish == "error":
            raise HttpError(500, view.reply.error, kind="server_error")
        return JSONResponse(view.body())


def _parse(parse, body: dict) -> inputs.Request:
    try:
        return parse(body)
    except inputs.BadRequest as err:
        raise HttpError(400, err.message, param=err.param) from None


def _too_long(prompt: int, ctx: int, handler: str) -> HttpError:
    if handler == "messages":
        return HttpError(400, f"prompt is too long: {prompt} tokens > {ctx - 1} maximum")
    param = {"responses": "input", "completions": "prompt"}.get(handler, "messages")
    return HttpError(400, f"the prompt has {prompt} tokens; the context holds {ctx}", code="context_length_exceeded",
                     param=param)


async def _read_json(request: Request) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > BODY_LIMIT:
        raise HttpError(413, f"the body is over {BODY_LIMIT >> 20} MiB")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # also chunked bodies, capped as they arrive
            size += len(chunk)
            if size > BODY_LIMIT:
                raise HttpError(413, f"the body is over {BODY_LIMIT >> 20} MiB")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HttpError(400, "the client closed the request") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise HttpError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body

