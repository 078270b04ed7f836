"""The HTTP side: a Starlette application of OpenAI's routes, and `serve` to run it with uvicorn.

Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`. With
`ApiConfig.api_key`, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise). Bodies are read up to
`ApiConfig.max_body_bytes` (413 beyond), malformed JSON is a 400, and every refusal is OpenAI's error object. Each
request generates on a worker thread (the event loop never waits on the swarm); streamed answers are server-sent
events, `data: {chunk}` lines ending with `data: [DONE]`, and a client that disconnects cancels its generation,
which closes its inference session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ...transport.errors import ConfigError, SwarmError
from ..chat import encode_chat, render_chat
from .config import ApiConfig
from .generation import Generation, Result
from .models import Loaded, ModelRegistry
from .protocol import ApiError, Request, chat_body, chunk, completion_body, new_id, parse_chat, parse_completion, usage

log = logging.getLogger(__name__)


class Api:
    """What the routes share: the settings, the models, the worker threads, and what was served (`stats`)."""

    def __init__(self, registry: ModelRegistry, config: ApiConfig):
        self.registry, self.config = registry, config
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="swarm-api")
        self.stats = {"requests": 0, "errors": 0, "tokens": 0}  # counts since start (for /health)
        self._stats_lock = threading.Lock()  # workers add the tokens they generated
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []  # told of each finished request

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()

    def note(self, event: str, **fields: Any) -> None:
        for observer in self.observers:
            observer(event, fields)

    def count(self, name: str, amount: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += amount

    def prepare(self, request: Request) -> tuple[Loaded, str | None, list[int], int]:
        """The request's model client, adapter, prompt token ids and token budget (blocking: a model may load)."""
        loaded, adapter = self.registry.resolve(request.model)
        prompt = _prompt_ids(loaded, request)
        return loaded, adapter, prompt, _budget(loaded, request, len(prompt), self.config)

    # --- routes ----------------------------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        with self._stats_lock:
            return JSONResponse({"status": "ok", **self.stats})

    async def models(self, request: HttpRequest) -> Response:
        entries = await asyncio.to_thread(self.registry.listing)
        data = [{"id": e.id, "object": "model", "created": 0, "owned_by": "swarm", "root": e.parent or e.id,
                 "parent": e.parent} for e in entries]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: HttpRequest) -> Response:
        return await self._answer(request, parse_chat)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._answer(request, parse_completion)

    async def _answer(self, http: HttpRequest, parse: Callable[[Any, ApiConfig], Request]) -> Response:
        self.count("requests")
        try:
            request = parse(await _json(http, self.config.max_body_bytes), self.config)
            loaded, adapter, prompt, max_tokens = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.prepare, request)
        except ApiError as e:
            self.count("errors")
            return error_response(e)
        except SwarmError as e:
            self.count("errors")
            return error_response(ApiError(f"the swarm cannot serve this request: {e}", status=503,
                                           type_="server_error", code="swarm_unavailable"))
        job = _Job(self, Generation(loaded, adapter, prompt, request.sampling, max_tokens), request)
        if request.stream:
            return _EventStream(job.events(), on_close=job.cancel)
        return await job.whole(http)


class _Job:
    """A generation seen from the event loop: its events come through an asyncio queue."""

    def __init__(self, api: Api, gen: Generation, request: Request):
        self.api, self.gen, self.request = api, gen, request
        self.id = new_id("chatcmpl" if request.chat else "cmpl")
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        self.started = time.monotonic()

    def _put(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _run(self) -> Result:
        try:
            result = self.gen.run()
        except BaseException as e:
            self._put("error", e, None)
            raise
        finally:  # what was generated counts, even for a client gone
            self.api.count("tokens", sum(len(c.tokens) for c in self.gen.choices))
        self._put("done", result, None)
        return result

    def cancel(self) -> None:
        self.gen.cancel()

    def start(self, stream: bool) -> asyncio.Future[Result]:
        if stream:
            self.gen.on_text = lambda i, text: self._put("text", i, text)
            self.gen.on_finish = lambda i, reason: self._put("finish", i, reason)
        return self.loop.run_in_executor(self.api.pool, self._run)

    def _noted(self, result: Result) -> None:
        elapsed = time.monotonic() - self.started
        self.api.note("answer", model=self.request.model, prompt_tokens=result.prompt_tokens,
                      completion_tokens=result.completion_tokens, seconds=elapsed,
                      first=None if self.gen.first_token is None else self.gen.first_token - self.started,
                      stream=self.request.stream)

    def _failed(self, error: BaseException) -> ApiError:
        self.api.count("errors")
        self.api.note("error", model=self.request.model)
        if isinstance(error, ApiError):
            return error
        if isinstance(error, ConfigError):
            return ApiError(str(error))
        if isinstance(error, SwarmError):
            return ApiError(f"the swarm could not finish the answer: {error}", status=503, type_="server_error",
                            code="swarm_unavailable")
        log.exception("generation failed", exc_info=error)
        return ApiError("internal error", status=500, type_="server_error")

    async def whole(self, http: HttpRequest) -> Response:
        """The answer in one body; generation stops when the client goes away meanwhile."""
        future = self.start(stream=False)
        while not future.done():
            await asyncio.wait([future], timeout=0.5)
            if not future.done() and await http.is_disconnected():
                self.cancel()
        try:
            result = future.result()
        except BaseException as e:
            return error_response(self._failed(e))
        self._noted(result)
        body = chat_body if self.request.chat else completion_body
        return JSONResponse(body(self.id, self.request.model, result.texts, result.reasons,
                                 usage(result.prompt_tokens, result.completion_tokens)))

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events."""
        request, model = self.request, self.request.model
        self.start(stream=True)
        if request.chat:
            for i in range(request.sampling.n):
                yield _sse(chunk(request, self.id, model, i, role=True))
        while True:
            kind, a, b = await self.queue.get()
            if kind == "text":
                yield _sse(chunk(request, self.id, model, a, text=b))
            elif kind == "finish":
                yield _sse(chunk(request, self.id, model, a, text=None if request.chat else "", reason=b))
            elif kind == "error":
                yield _sse(self._failed(a).body())
                break
            else:
                self._noted(a)
                if request.include_usage:
                    yield _sse(chunk(request, self.id, model, None,
                                     use=usage(a.prompt_tokens, a.completion_tokens)))
                break
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` when they end, whether finished or cut by the client leaving (which
    is listened for the whole time, so a client gone between two tokens is noticed at once)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _json(http: HttpRequest, limit: int) -> Any:
    """The request's JSON body: 413 when longer than `limit` bytes, 400 when it is not JSON."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(f"the request body is larger than {limit} bytes", status=413, code="body_too_large")
    data = bytearray()
    async for piece in http.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(f"the request body is larger than {limit} bytes", status=413, code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _prompt_ids(loaded: Loaded, request: Request) -> list[int]:
    """The prompt's token ids: chat messages through the chat template (as `ChatSession` renders them), or the
    completion prompt (with the tokenizer's special tokens) or its token ids."""
    tokenizer = loaded.tokenizer
    if request.chat:
        from jinja2 import TemplateError

        try:
            text = render_chat(tokenizer, list(request.messages))
        except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
            raise ApiError(f"the model's chat template refuses these messages: {e}", param="messages") from None
        return list(encode_chat(tokenizer, text))
    if isinstance(request.prompt, tuple):
        vocab = len(tokenizer)
        if any(t >= vocab for t in request.prompt):
            raise ApiError(f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        return list(request.prompt)
    return list(tokenizer(request.prompt)["input_ids"])


def _budget(loaded: Loaded, request: Request, prompt_length: int, config: ApiConfig) -> int:
    """The most tokens the answer may have: what it asks (400 when the context cannot hold it), else what fits."""
    room = loaded.context - prompt_length
    asked = request.sampling.max_tokens
    if room < 1 or (asked is not None and asked > room):
        want = f" plus {asked} tokens to generate" if asked is not None else ""
        raise ApiError(f"this model's context holds {loaded.context} tokens; the prompt has {prompt_length}{want}",
                       param="max_tokens" if asked is not None else "messages", code="context_length_exceeded")
    return asked if asked is not None else min(room, config.max_tokens)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Auth:
    """ASGI middleware: /v1 routes need `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                error = ApiError("a valid API key is needed: Authorization: Bearer KEY", status=401,
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(api: Api, metrics: Any = None) -> Any:
    """The ASGI application of `api`'s routes (behind the key check when the API has a key; every request counted by
    `metrics`, an `ApiMetrics`, when given)."""
    app = Starlette(routes=[
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ], exception_handlers={404: _not_found, 405: _not_allowed})
    app = app if api.config.api_key is None else _Auth(app, api.config.api_key)
    return app if metrics is None else metrics.middleware(app)


async def _not_found(request: HttpRequest, exc: Exception) -> Response:
    return error_response(ApiError(f"no route {request.url.path}", status=404, code="not_found"))


async def _not_allowed(request: HttpRequest, exc: Exception) -> Response:
    return error_response(ApiError(f"{request.method} is not allowed on {request.url.path}", status=405,
                                   code="method_not_allowed"))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); ConfigError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(api: Api, sock: socket.socket, metrics: Any = None) -> None:
    """Serve `api` on the bound `sock` until SIGINT or SIGTERM (uvicorn's handlers: answers in flight get a few
    seconds), then stop its work. uvicorn raises the signal again once it has stopped: SIGTERM is then a normal end
    here, SIGINT a KeyboardInterrupt."""
    import uvicorn

    config = uvicorn.Config(build_app(api, metrics), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        api.close()
        sock.close()
