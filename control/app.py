"""The Starlette app: routes, request parsing, errors as JSON, SSE streaming."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from control import openai_format
from control.inline import ENCODINGS, entries_for_steps, inline_activations
from control.openapi import openapi_spec
from control.service import ChatJob, ChatResult, ModelService, ServiceConfig
from engine.blas import BLAS_IN_USE
from engine.errors import CaptureTooLarge, InvalidRequest, MalformedRequest, NotFound, NSBridgeError
from engine.hooks import CaptureOptions, hook_points, resolve_hooks
from shm import CaptureBudgetExceeded, ShmRegistry, ShmSpaceError, UnknownSegment, write_capture
from shm.writer import stored_shape

log = logging.getLogger("nsbridge.control")

TRANSPORTS = ("inline", "shm")


@dataclass
class AppConfig:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    shm_ttl_s: float = 600.0
    shm_budget_bytes: int | None = None  # None: derived from /dev/shm free space
    state_dir: str | None = None


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(exc: NSBridgeError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


async def read_json(request: Request) -> dict:
    body = await request.body()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return data


class Server:
    """Handlers bound to one service and one shared-memory registry."""

    def __init__(self, config: AppConfig, service: ModelService, registry: ShmRegistry):
        self.config, self.service, self.registry = config, service, registry

    # --- models ---------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        lm = self.service.lm
        return JSONResponse({
            "status": "ok",
            "model_loaded": lm is not None,
            "model_id": lm.info.model_id if lm else None,
            "queued": self.service.queued,
            "blas": BLAS_IN_USE,
        })

    def _model_card(self) -> dict:
        lm = self.service.require_model()
        return {"id": lm.info.model_id, "object": "model", "created": 0, "owned_by": "nsbridge",
                "supports_activations": True, **lm.info.to_dict()}

    async def list_models(self, request: Request) -> Response:
        data = [self._model_card()] if self.service.lm else []
        return JSONResponse({"object": "list", "data": data})

    async def load_model(self, request: Request) -> Response:
        body = await read_json(request)
        model_path, model_id = body.get("model_path"), body.get("model_id")
        if not isinstance(model_path, str) or not model_path.strip():
            raise InvalidRequest("'model_path' is required: a model folder, a .gguf file, or \"default\"",
                                 "model_path")
        if model_id is not None and not isinstance(model_id, str):
            raise InvalidRequest("'model_id' must be a string", "model_id")
        self.service.check_model_path(model_path)
        started = time.perf_counter()
        lm = await self.service.run(self.service.load, model_path, model_id)
        return JSONResponse({
            "model_id": lm.info.model_id, "status": "loaded", "supports_activations": True,
            "load_time_s": round(time.perf_counter() - started, 3), **lm.info.to_dict(),
        })

    # --- hooks ----------------------------------------------------------------------------
    async def register_hooks(self, request: Request) -> Response:
        body = await read_json(request)
        hooks = body.get("hooks")
        resolve_hooks(self.service.require_model(), hooks)  # validate now, not on first use
        self.service.registered_hooks = hooks
        return JSONResponse({"status": "registered", "hooks": hooks, "count": len(hooks)})

    async def list_hooks(self, request: Request) -> Response:
        return JSONResponse({"hooks": self.service.registered_hooks, "count": len(self.service.registered_hooks)})

    async def clear_hooks(self, request: Request) -> Response:
        n = len(self.service.registered_hooks)
        self.service.registered_hooks = []
        return JSONResponse({"status": "cleared", "cleared": n})

    async def points(self, request: Request) -> Response:
        lm = self.service.require_model()
        return JSONResponse({"model_id": lm.info.model_id, "n_layers": lm.info.n_layers,
                             "points": hook_points(lm)})

    # --- captures in shared memory --------------------------------------------------------
    async def list_captures(self, request: Request) -> Response:
        self.registry.reap_expired()
        return JSONResponse(self.registry.status())

    def _capture_id(self, request: Request) -> str:
        return request.path_params["capture_id"]

    async def get_capture(self, request: Request) -> Response:
        capture_id = self._capture_id(request)
        try:
            data = self.registry.read_bytes(capture_id)
        except (UnknownSegment, KeyError):
            raise NotFound(f"no live capture {capture_id!r}: it was released, expired, or never existed")
        return Response(bytes(data), media_type="application/vnd.apache.arrow.stream",
                        headers={"Content-Disposition": f'attachment; filename="{capture_id}.arrows"'})

    async def release_capture(self, request: Request) -> Response:
        capture_id = self._capture_id(request)
        if not self.registry.release(capture_id):
            raise NotFound(f"no live capture {capture_id!r}: it was released, expired, or never existed")
        return JSONResponse({"capture_id": capture_id, "status": "released"})

    # --- chat -----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await read_json(request)
        return await self._chat(body, with_activations=False, request=request)

    async def chat_with_activations(self, request: Request) -> Response:
        body = await read_json(request)
        return await self._chat(body, with_activations=True, request=request)

    async def _chat(self, body: dict, with_activations: bool, request: Request) -> Response:
        hooks = transport = encoding = None
        options = CaptureOptions()
        if with_activations:
            hooks = body.get("activation_hooks")
            if hooks is None or hooks == []:
                hooks = self.service.registered_hooks or None
            if hooks is None:
                raise InvalidRequest(
                    "no activation hooks: send 'activation_hooks' or register them with POST /v1/activations/hooks",
                    "activation_hooks",
                )
            transport = body.get("activations_transport", "inline")
            if transport not in TRANSPORTS:
                raise InvalidRequest(f"'activations_transport' must be one of {', '.join(TRANSPORTS)}",
                                     "activations_transport")
            encoding = body.get("activations_encoding", "json")
            if encoding not in ENCODINGS:
                raise InvalidRequest(f"'activations_encoding' must be one of {', '.join(ENCODINGS)}",
                                     "activations_encoding")
            options = CaptureOptions.parse(body.get("activation_positions"), body.get("activation_dtype"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean", "stream")
        job = self.service.prepare_chat(body, hooks, options)
        if transport == "shm" and job.targets:
            self._check_shm_room()
        model_id = self.service.lm.info.model_id
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise InvalidRequest("'stream_options' must be an object such as {\"include_usage\": true}",
                                 "stream_options")
        if stream:
            self.service.check_room()  # a full queue answers 503, not a 200 stream holding an error
            include_usage = stream_options.get("include_usage", False)
            if not isinstance(include_usage, bool):
                raise InvalidRequest("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
            return StreamingResponse(
                self._stream(job, completion_id, model_id, transport, encoding, include_usage, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._run_while_connected(job, request)
        response = openai_format.completion(completion_id, model_id, result.generation)
        if with_activations:
            response.update(await self._deliver(result, transport, encoding))
            if "capture" in response and await request.is_disconnected():
                # The client gave up (e.g. its timeout) and will never release it: don't keep it until its TTL.
                self.registry.release(response["capture"]["capture_id"])
        return ORJSONResponse(response)

    async def _run_while_connected(self, job: ChatJob, request: Request) -> ChatResult:
        """Run a non-streamed job; a client that goes away cancels it at the next token."""
        run = asyncio.ensure_future(self.service.run(self.service.run_chat, job))
        while not run.done():
            await asyncio.wait([run], timeout=0.25)
            if not run.done() and await request.is_disconnected():
                job.cancelled.set()
        return run.result()

    def _check_shm_room(self) -> None:
        status = self.registry.status()
        if status.get("budget_bytes") and status.get("live_bytes", 0) >= status["budget_bytes"]:
            raise CaptureTooLarge(
                "the shared-memory budget is used up by live captures; release some "
                "(DELETE /v1/activations/{id}) or wait for them to expire", "activations_transport")

    async def _deliver(self, result: ChatResult, transport: str, encoding: str) -> dict:
        capture = result.capture
        out: dict = {"tokens": capture.tokens if capture else [], "token_ids": result.generation.token_ids}
        if capture is None:
            out["activations"] = {}
        elif transport == "inline":
            out["activations"] = inline_activations(capture, encoding)
        else:
            handle = await asyncio.get_running_loop().run_in_executor(None, self._write_shm, capture)
            out["capture"] = {"capture_id": capture.capture_id, "handle": handle}
            out["activations"] = _shm_entries(capture, handle)
        return out

    def _write_shm(self, capture) -> dict:
        try:
            return write_capture(capture, self.registry, ttl_s=self.config.shm_ttl_s).to_dict()
        except (CaptureBudgetExceeded, ShmSpaceError) as exc:  # not a 500: the client can release or shrink
            raise CaptureTooLarge(f"{exc}; release captures (DELETE /v1/activations/{{id}}) or lower the request's "
                                  "size", "activations_transport") from exc

    async def _stream(self, job: ChatJob, completion_id: str, model_id: str, transport: str | None,
                      encoding: str | None, include_usage: bool,
                      request: Request) -> AsyncIterator[bytes]:
        """SSE: a role chunk, one chunk per token (with that step's activations inline), [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        created = int(time.time())

        def on_event(event, capture):
            acts = None
            if capture is not None and transport == "inline":
                # The step that produced this token; the last token also brings the final step.
                steps = {event.step} if event.finish_reason is None else {event.step, event.step + 1}
                acts = entries_for_steps(capture.records, steps, encoding)
            loop.call_soon_threadsafe(queue.put_nowait, ("event", event, acts))

        async def produce():
            try:
                result = await self.service.run(self.service.run_chat, job, on_event)
                await queue.put(("done", result, None))
            except Exception as exc:  # reported to the client as an SSE error event
                await queue.put(("error", exc, None))

        task = asyncio.create_task(produce())
        final_chunk = None  # with a capture, the last chunk waits for the capture to be complete
        unsent = None  # (shm write, capture id) until the chunk with its handle has been sent
        try:
            yield sse(openai_format.chunk(completion_id, model_id, created, {"role": "assistant", "content": ""}))
            while True:
                kind, item, acts = await queue.get()
                if kind == "event":
                    delta = {"content": item.text} if item.text or item.finish_reason is None else {}
                    chunk = openai_format.chunk(completion_id, model_id, created, delta, item.finish_reason)
                    if acts is not None:
                        chunk["activations"] = acts
                    if item.finish_reason is not None and transport is not None:
                        final_chunk = chunk
                    else:
                        yield sse(chunk)
                elif kind == "done":
                    result: ChatResult = item
                    if transport is not None:
                        final_chunk = final_chunk or openai_format.chunk(
                            completion_id, model_id, created, {}, result.generation.finish_reason)
                        final_chunk["tokens"] = result.capture.tokens if result.capture else []
                        final_chunk["token_ids"] = result.generation.token_ids
                        if transport == "shm" and result.capture is not None:
                            write = loop.run_in_executor(None, self._write_shm, result.capture)
                            unsent = (write, result.capture.capture_id)
                            try:
                                handle = await asyncio.shield(write)  # client gone mid-write: see finally
                            except NSBridgeError as exc:  # e.g. over the shm budget: the 200 is already sent
                                unsent = None
                                yield sse(exc.to_dict())
                                yield b"data: [DONE]\n\n"
                                return
                            if await request.is_disconnected():
                                return  # a send now would be dropped silently; finally releases the capture
                            final_chunk["capture"] = {"capture_id": result.capture.capture_id, "handle": handle}
                            final_chunk["activations"] = _shm_entries(result.capture, handle)
                        yield sse(final_chunk)
                        unsent = None
                    if include_usage:
                        yield sse(openai_format.usage_chunk(completion_id, model_id, created, result.generation))
                    yield b"data: [DONE]\n\n"
                    return
                else:
                    err = item if isinstance(item, NSBridgeError) else NSBridgeError(f"generation failed: {item}")
                    if not isinstance(item, NSBridgeError):
                        log.error("generation failed: %r", item)
                    yield sse(err.to_dict())
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            # Client gone (or stream done): stop the worker at its next token; its capture is dropped.
            job.cancelled.set()
            if unsent is not None:  # the handle never reached the client: release the capture once written
                write, capture_id = unsent
                write.add_done_callback(
                    lambda f: f.cancelled() or f.exception() is not None or self.registry.release(capture_id))
            if not task.done():
                await asyncio.wait([task], timeout=30)


def _shm_entries(capture, handle: dict) -> dict:
    """Entries that describe each hook's array in the Arrow stream instead of carrying data."""
    out: dict = {}
    for rec in capture.hooks:
        if not rec.steps:
            continue
        shape = [int(d) for d in stored_shape(rec)]
        out.setdefault(rec.hook_id, []).append({
            "hook_id": rec.hook_id, "layer_name": rec.layer_name, "component": rec.component,
            "shape": shape, "dtype": rec.dtype, "is_input": rec.is_input, "module_path": rec.module_path,
            "steps": len(rec.steps), "handle": handle,
        })
    return out


class APIKeyMiddleware:
    """Bearer-token check for every route but /health (pure ASGI, so streaming is untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(auth, f"Bearer {self.api_key}"):
                body = {"error": {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: AppConfig, service: ModelService | None = None, registry: ShmRegistry | None = None) -> Starlette:
    service = service or ModelService(config.service)
    registry = registry or ShmRegistry(state_dir=config.state_dir, budget_bytes=config.shm_budget_bytes,
                                       ttl_s=config.shm_ttl_s)
    server = Server(config, service, registry)

    async def handle_error(request: Request, exc: NSBridgeError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc, headers)

    async def handle_http(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no route {request.method} {request.url.path}; see GET /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": kind}}, status_code=exc.status_code, headers=exc.headers)

    async def handle_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "server_error", "param": None, "code": "internal_error"}},
                            status_code=500)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec(routes))

    s = server
    routes = [
        Route("/health", s.health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", s.list_models, methods=["GET"]),
        Route("/v1/models/load", s.load_model, methods=["POST"]),
        Route("/v1/chat/completions", s.chat, methods=["POST"]),
        Route("/v1/chat/completions/with_activations", s.chat_with_activations, methods=["POST"]),
        Route("/v1/activations/hooks", s.register_hooks, methods=["POST"]),
        Route("/v1/activations/hooks", s.list_hooks, methods=["GET"]),
        Route("/v1/activations/hooks", s.clear_hooks, methods=["DELETE"]),
        Route("/v1/activations/hooks/clear", s.clear_hooks, methods=["POST"]),
        Route("/v1/activations/points", s.points, methods=["GET"]),
        Route("/v1/activations", s.list_captures, methods=["GET"]),
        Route("/v1/activations/{capture_id}", s.get_capture, methods=["GET"]),
        Route("/v1/activations/{capture_id}", s.release_capture, methods=["DELETE"]),
        Route("/v1/activations/{capture_id}/release", s.release_capture, methods=["POST"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    if config.api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=config.api_key))

    async def reaper():
        while True:
            await asyncio.sleep(5)
            registry.reap_expired()

    reaper_task: list[asyncio.Task] = []

    @contextlib.asynccontextmanager  # a bare async generator is deprecated in Starlette
    async def lifespan(app):
        reaper_task.append(asyncio.create_task(reaper()))
        yield
        reaper_task[0].cancel()
        service.shutdown()
        registry.close()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={NSBridgeError: handle_error, HTTPException: handle_http, Exception: handle_unexpected},
        lifespan=lifespan,
    )
    app.state.server = server
    return app
