"""The HTTP side: a Starlette app with OpenAI's endpoints. Handlers check the request, encode the prompt and queue a
job; the scheduler's thread generates and hands each event over with ``loop.call_soon_threadsafe``, so the event
loop never waits on ONNX Runtime and a slow generation never blocks other clients' requests (or their 429s)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import LoraEdgeError
from .options import ServeOptions
from .scheduler import Cancelled, Job, QueueFull, Scheduler
from .schemas import ApiError, GenRequest, Reply, bad, parse

log = logging.getLogger("lora_edge.serve")
BASE_ALIAS = "base"  # always accepted for the base model, whatever its listed id
MAX_BODY = 8 << 20  # bytes: far more than any prompt that fits a context, far less than what could exhaust memory


class Api:
    """The endpoints over one loaded decoder package and its scheduler."""

    def __init__(self, model, name: str | None = None, options: ServeOptions | None = None) -> None:
        options = options or ServeOptions()
        self.model, self.api_key = model, options.api_key
        self.base_id = name if name and name not in model.adapters else BASE_ALIAS
        self.scheduler = Scheduler(model, options.max_queue, options.parallel, options.context)
        self.created = int(time.time())

    # -- checks ---------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")

    @property
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.model.adapters]

    def adapter_for(self, model_id: str) -> str | None:
        if model_id in (self.base_id, BASE_ALIAS) and model_id not in self.model.adapters:
            return None
        if model_id in self.model.adapters:
            return model_id
        available = ", ".join(self.model_ids)
        raise ApiError(404, f"model {model_id!r} does not exist; available: {available}", "model", code="model_not_found")

    def encode(self, req: GenRequest) -> list[int]:
        """The prompt's token ids (runs in a worker thread: a chat template renders in milliseconds, not microseconds)."""
        param = "messages" if req.chat else "prompt"
        if isinstance(req.prompt, list) and not req.chat:  # token ids
            if not all(0 <= t < self.model.vocab_size for t in req.prompt):
                raise bad("prompt", f"token ids must lie in [0, {self.model.vocab_size})")
            return req.prompt
        try:
            ids = self.model.tokenizer.encode(req.prompt, chat=req.chat)
        except LoraEdgeError as exc:
            raise bad(param, str(exc)) from None
        if not ids:
            raise bad(param, f"the {param} encode to no tokens")
        return ids

    def budget(self, req: GenRequest, prompt_tokens: int) -> int:
        """max_tokens, checked against the context left after the prompt (the whole rest of it when not given)."""
        context = self.scheduler.context
        room = context - prompt_tokens
        if room < 1:
            what = f"the prompt ({prompt_tokens} tokens) fills the server's context of {context} tokens per request"
            raise bad("messages" if req.chat else "prompt", what)
        if req.max_tokens is None:
            return room
        if req.max_tokens > room:
            raise bad("max_tokens", f"the prompt ({prompt_tokens} tokens) + max_tokens ({req.max_tokens}) exceed the server's "
                                    f"context of {context} tokens per request; lower max_tokens")  # fmt: skip
        return req.max_tokens

    # -- endpoints ------------------------------------------------------------------------------
    def model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "lora-edge"}

    async def list_models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card(m) for m in self.model_ids]})

    async def get_model(self, request: Request) -> JSONResponse:
        self.authorize(request)
        model_id = request.path_params["model"]
        self.adapter_for(model_id)
        return JSONResponse(self.model_card(model_id))

    async def chat(self, request: Request):
        return await self.generate(request, chat=True)

    async def completions(self, request: Request):
        return await self.generate(request, chat=False)

    async def generate(self, request: Request, chat: bool):
        self.authorize(request)
        req = parse(await _read_json(request), chat)
        adapter = self.adapter_for(req.model)
        ids = await run_in_threadpool(self.encode, req)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:  # from the scheduler's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        budget = self.budget(req, len(ids))
        job = Job(ids, adapter, budget, req.sampling, req.stops, emit, min(req.min_tokens, budget))
        try:
            self.scheduler.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from None
        reply = Reply(req)
        if req.stream:
            return _Stream(self.sse(reply, events, len(ids)), job)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job, events))
        try:
            text = []
            while (event := await events.get())[0] == "text":
                text.append(event[1])
        except BaseException:  # cancelled (the server is stopping): the generation must not outlive its request
            job.cancel()
            raise
        finally:
            watcher.cancel()
        if event[0] == "error":
            raise failure(event[1])
        return JSONResponse(reply.full("".join(text), event[1], len(ids), event[2]))

    async def sse(self, reply: Reply, events: asyncio.Queue, prompt_tokens: int):
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; an error after the first chunk
        (the status is sent by then) is a last ``data: {"error": ...}`` event."""
        if reply.req.chat:  # the role comes first, at once, as OpenAI sends it
            yield _event(reply.chunk(first=True))
        while (event := await events.get())[0] == "text":
            yield _event(reply.chunk(event[1]))
        if event[0] == "error":
            yield _event(failure(event[1]).body())
        else:
            yield _event(reply.chunk(finish=event[1]))
            if reply.req.include_usage:
                yield _event(reply.usage_chunk(prompt_tokens, event[2]))
        yield "data: [DONE]\n\n"


async def _read_json(request: Request):
    """The body as JSON, read in chunks so that an oversized one is refused before it is all in memory."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body exceeds {MAX_BODY >> 20} MiB")
    try:
        return json.loads(body)
    except ValueError as exc:  # (UnicodeDecodeError too)
        raise bad(None, f"the request body is not valid JSON ({exc})"[:200]) from None


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def failure(exc: BaseException) -> ApiError:
    """A job's error as the client sees it: the runtime's one-line message for a bad request, nothing internal else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LoraEdgeError):
        return bad(None, str(exc))
    if isinstance(exc, Cancelled):  # (a client that left sees nothing: this reaches one only when the server stops)
        return ApiError(503, f"{exc}: the server is shutting down", kind="server_error")
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), kind="server_error")
    return ApiError(500, "generation failed; the server's log has the details", kind="server_error")


async def _cancel_on_disconnect(request: Request, job: Job, events: asyncio.Queue) -> None:
    """A non-streaming client that hangs up frees the scheduler too (the body is read: the next message is the end),
    and its handler ends now, not when the scheduler reaches the job."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    events.put_nowait(("error", Cancelled("the client disconnected")))


class _Stream(StreamingResponse):
    """A streamed reply whose job is cancelled however the stream ends: Starlette cancels the stream when the client
    disconnects, which may leave our generator suspended rather than closed."""

    def __init__(self, content, job: Job) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # (proxies must not buffer the stream)
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
    return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(), exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed", exc_info=exc)
    return JSONResponse(failure(exc).body(), status_code=500)


def build_app(model, name: str | None = None, options: ServeOptions | None = None) -> Starlette:
    """The server's ASGI app over a loaded decoder package. ``name``: the base model's id (default "base")."""
    api = Api(model, name, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        api.scheduler.start()
        yield
        await run_in_threadpool(api.scheduler.close)

    routes = [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/health", lambda request: JSONResponse({"status": "ok", "running": api.scheduler.running,
                                                       "waiting": api.scheduler.waiting}), methods=["GET"]),  # fmt: skip
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.api = api
    return app
