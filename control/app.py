"""The Starlette app: the route table and its handlers.

A handler parses its body once with the endpoint's schema (control/schemas.py), plans the
request off the event loop, runs it on the model's worker thread and answers. Errors are
raised as HTTPError (control/errors.py) and become OpenAI-style JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from control import openai_format, viz
from control.delivery import Delivery
from control.errors import HTTPError, InvalidRequest, NotFound, error_body, error_response, from_engine
from control.harvest import Harvests, harvest_root
from control.openapi import openapi_spec
from control.schemas import (ActivationChatRequest, AttributionRequest, ChatRequest, CreateVectorRequest,
                             LoadModelRequest, RegisterHooksRequest, parse_body)
from control.security import DEFAULT_MAX_BODY_BYTES, SecurityConfig, security_middleware
from control.service import ModelService, ServiceConfig
from control.streaming import stream_chat
from engine.attribution import ARROW_STREAM, attribution_arrow
from engine.blas import BLAS_IN_USE
from engine.errors import EngineError
from shm import ShmRegistry

log = logging.getLogger("nsbridge.control")


@dataclass
class AppConfig:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides loopback ("*": any)
    bound_host: str = "127.0.0.1"  # the address listened on; served by name unless 0.0.0.0 or ::
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shm_ttl_s: float = 600.0
    shm_budget_bytes: int | None = None  # None: derived from /dev/shm free space
    state_dir: str | None = None
    harvest_dir: str | None = None  # where harvest jobs write (None: $NSBRIDGE_HOME/harvest)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class Server:
    """Handlers bound to one service and one shared-memory delivery."""

    def __init__(self, config: AppConfig, service: ModelService, delivery: Delivery):
        self.config, self.service, self.delivery = config, service, delivery
        self.harvests = Harvests(service, harvest_root(config.harvest_dir))

    # --- models ---------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Liveness, the loaded model, the server's limits and the BLAS in use."""
        model = self.service.model
        return JSONResponse({
            "status": "ok",
            "model_loaded": model is not None,
            "model_id": model.info.model_id if model else None,
            "queued": self.service.queued,
            "decoding": self.service.decoding,
            "limits": self.service.config.limits(),
            "blas": BLAS_IN_USE,
        })

    def _model_card(self) -> dict:
        info = self.service.require_model().info
        return {"id": info.model_id, "object": "model", "created": 0, "owned_by": "nsbridge",
                "supports_activations": True, **info.to_dict()}

    async def list_models(self, request: Request) -> Response:
        """The loaded model (OpenAI list format)."""
        data = [self._model_card()] if self.service.model else []
        return JSONResponse({"object": "list", "data": data})

    async def load_model(self, request: Request) -> Response:
        """Load a model (replaces the current one and its registered hooks)."""
        body = parse_body(await request.body(), LoadModelRequest)
        self.service.check_model_path(body.model_path)
        started = time.perf_counter()
        model = await self.service.run(self.service.load, body.model_path, body.model_id)
        return JSONResponse({
            "model_id": model.info.model_id, "status": "loaded", "supports_activations": True,
            "load_time_s": round(time.perf_counter() - started, 3), **model.info.to_dict(),
        })

    # --- hooks ----------------------------------------------------------------------------
    def _hooks(self) -> list[dict]:
        model = self.service.model
        return [h.model_dump(exclude_defaults=True) for h in model.activation_hooks] if model else []

    async def register_hooks(self, request: Request) -> Response:
        """Register hooks used by later activation requests that name none."""
        body = parse_body(await request.body(), RegisterHooksRequest)
        self.service.set_hooks(body.hooks)  # validated now, not on first use
        hooks = self._hooks()
        return JSONResponse({"status": "registered", "hooks": hooks, "count": len(hooks)})

    async def list_hooks(self, request: Request) -> Response:
        """The registered hooks."""
        hooks = self._hooks()
        return JSONResponse({"hooks": hooks, "count": len(hooks)})

    async def clear_hooks(self, request: Request) -> Response:
        """Clear the registered hooks (POST twin for SqueakJS, which cannot send DELETE)."""
        model = self.service.model
        return JSONResponse({"status": "cleared", "cleared": model.clear_activation_hooks() if model else 0})

    async def points(self, request: Request) -> Response:
        """Every hook point of the loaded model, with its names and shape per token."""
        model = self.service.require_model()
        return JSONResponse({"model_id": model.info.model_id, "n_layers": model.info.n_layers,
                             "points": model.hook_points()})

    # --- captures in shared memory --------------------------------------------------------
    async def list_captures(self, request: Request) -> Response:
        """Live shared-memory captures."""
        return JSONResponse(self.delivery.status())

    async def get_capture(self, request: Request) -> Response:
        """A capture's Arrow IPC stream (query `hooks=a,b`: only those columns; `heads=0,3`: only those heads)."""
        capture_id = request.path_params["capture_id"]
        data = self.delivery.read(capture_id)
        body = await viz.get_capture_columns(request, data)  # ?hooks=a,b&heads=0,3: only those columns
        return Response(body, media_type="application/vnd.apache.arrow.stream",
                        headers={"Content-Disposition": f'attachment; filename="{capture_id}.arrows"'})

    async def release_capture(self, request: Request) -> Response:
        """Release a capture (POST twin for SqueakJS, which cannot send DELETE)."""
        capture_id = request.path_params["capture_id"]
        if not self.delivery.release(capture_id):
            raise NotFound(f"no live capture {capture_id!r}: it was released, expired, or never existed")
        return JSONResponse({"capture_id": capture_id, "status": "released"})

    # --- stored vectors (for add / set / project_out interventions) ----------------------
    async def create_vector(self, request: Request) -> Response:
        """Store a vector: numbers, base64, a capture's mean or last row, or a llama.cpp control
        vector (one per layer). Vectors belong to the loaded model and go when another loads."""
        body = parse_body(await request.body(), CreateVectorRequest)
        kind = body.source()
        store = self.service.require_model().vectors
        label = {"name": body.name}
        try:
            if kind == "vector":
                made = [store.add(body.vector, layer=body.layer, source={"kind": "inline"}, **label)]
            elif kind == "data":
                made = [store.add_base64(body.data, body.dtype, body.shape, layer=body.layer, **label)]
            elif kind == "from_capture":
                src = body.from_capture
                hook, prompt_tokens = await run_in_threadpool(self.delivery.hook, src.capture_id, src.hook_id)
                made = [store.from_capture(hook, reduce=src.reduce, positions=src.positions, capture_id=src.capture_id,
                                           hook_id=src.hook_id, prompt_tokens=prompt_tokens, **label)]
            else:
                made = await run_in_threadpool(store.import_controlvector, _base64(body.controlvector, kind), **label)
        except EngineError as exc:
            raise from_engine(exc, {"source": "from_capture"}) from exc
        if kind == "controlvector":
            return JSONResponse({"object": "list", "data": [v.describe() for v in made]}, status_code=201)
        return JSONResponse(made[0].describe(), status_code=201)

    async def list_vectors(self, request: Request) -> Response:
        """The stored vectors (without their values)."""
        model = self.service.model
        vectors = [v.describe() for v in model.vectors.list()] if model else []
        return JSONResponse({"object": "list", "data": vectors})

    async def get_vector(self, request: Request) -> Response:
        """A stored vector with its values."""
        vector = self._vector(request.path_params["vector_id"])
        return ORJSONResponse({**vector.describe(), "vector": vector.data})

    async def delete_vector(self, request: Request) -> Response:
        """Delete a stored vector (POST twin for SqueakJS, which cannot send DELETE)."""
        vector = self._vector(request.path_params["vector_id"])
        self.service.model.vectors.delete(vector.vector_id)
        return JSONResponse({"vector_id": vector.vector_id, "status": "deleted"})

    def _vector(self, vector_id: str):
        try:
            return self.service.require_model().vectors.get(vector_id)
        except EngineError as exc:
            raise from_engine(exc) from exc

    # --- attribution patching -------------------------------------------------------------
    async def attribution(self, request: Request) -> Response:
        """Attribution patching: every site's effect on a metric from one backward pass."""
        body = parse_body(await request.body(), AttributionRequest)
        plan = await run_in_threadpool(self.service.prepare_attribution, body)  # tokenizing: off the event loop
        result = await self.service.run(self.service.run_attribution, plan)
        result = {"object": "attribution", "model": plan.lm.info.model_id, **result}
        if ARROW_STREAM in request.headers.get("accept", ""):  # large answers: one Arrow IPC stream
            return Response(await run_in_threadpool(attribution_arrow, result), media_type=ARROW_STREAM)
        return ORJSONResponse(result)

    # --- chat -----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        """OpenAI chat completions (stream with SSE)."""
        return await self._chat(request, parse_body(await request.body(), ChatRequest), with_activations=False)

    async def chat_with_activations(self, request: Request) -> Response:
        """Chat plus the activations of every prompt and generated token."""
        body = parse_body(await request.body(), ActivationChatRequest)
        return await self._chat(request, body, with_activations=True)

    async def _chat(self, request: Request, body: Any, with_activations: bool) -> Response:
        # Tokenizing a long prompt takes seconds: not on the event loop.
        job = await run_in_threadpool(self.service.prepare_chat, body, with_activations, self.delivery.patch_source)
        transport = body.activations_transport if with_activations else None
        encoding = body.activations_encoding if with_activations else None
        if transport == "shm":
            self.delivery.check_room()
        model_id = self.service.model.info.model_id
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        if body.stream:
            self.service.check_room()  # a full queue answers 503, not a 200 stream holding an error
            include_usage = body.stream_options.include_usage if body.stream_options else False
            return StreamingResponse(
                stream_chat(self.service, self.delivery, job, completion_id, model_id, transport, encoding,
                            include_usage, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._run_while_connected(job, request)
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        response = openai_format.completion(completion_id, model_id, result, job.plan.lm.tokenizer)
        response.update(openai_format.intervention_fields(result, job.baseline_result, job.plan.sampling.seed,
                                                             job.plan.lm.tokenizer))
        if with_activations:
            response.update(await self.delivery.deliver(result, transport, encoding))
            if "capture" in response and await request.is_disconnected():
                # The client gave up (e.g. its timeout) and will never release it: don't keep it until its TTL.
                self.delivery.release(response["capture"]["capture_id"])
        return ORJSONResponse(response)

    async def _run_while_connected(self, job, request: Request):
        """Run a non-streamed job; a client that goes away cancels it at the next token."""
        run = asyncio.ensure_future(self.service.chat(job))
        while not run.done():
            await asyncio.wait([run], timeout=0.25)
            if not run.done() and await request.is_disconnected():
                job.cancelled.set()
        return run.result()


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"'{field}' is not valid base64: {exc}", field) from None


async def _handle_error(request: Request, exc: HTTPError) -> Response:
    return error_response(exc)


async def _handle_engine_error(request: Request, exc: EngineError) -> Response:
    return error_response(from_engine(exc))


async def _handle_http(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: f"no route {request.method} {request.url.path}; see GET /openapi.json",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    headers = exc.headers
    if exc.status_code == 405:  # every method of the path, not only those of the route that matched first
        headers = {"Allow": ", ".join(sorted({m for r in request.app.routes if isinstance(r, Route)
                                              and r.matches(request.scope)[0] != Match.NONE for m in r.methods}))}
    return JSONResponse(error_body(message, "invalid_request_error", code), status_code=exc.status_code,
                        headers=headers)


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error"),
                        status_code=500)


def routes(s: Server) -> list[Route]:
    """The route table; the OpenAPI document is generated from it."""

    async def openapi(request: Request) -> Response:
        """This document."""
        return JSONResponse(openapi_spec(table))

    table = [
        Route("/health", s.health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", s.list_models, methods=["GET"]),
        Route("/v1/models/load", s.load_model, methods=["POST"]),
        Route("/v1/chat/completions", s.chat, methods=["POST"]),
        Route("/v1/chat/completions/with_activations", s.chat_with_activations, methods=["POST"]),
        Route("/v1/attribution", s.attribution, methods=["POST"]),
        Route("/v1/activations/hooks", s.register_hooks, methods=["POST"]),
        Route("/v1/activations/hooks", s.list_hooks, methods=["GET"]),
        Route("/v1/activations/hooks", s.clear_hooks, methods=["DELETE"]),
        Route("/v1/activations/hooks/clear", s.clear_hooks, methods=["POST"]),
        Route("/v1/activations/points", s.points, methods=["GET"]),
        Route("/v1/activations", s.list_captures, methods=["GET"]),
        Route("/v1/activations/{capture_id:capture_id}", s.get_capture, methods=["GET"]),
        Route("/v1/activations/{capture_id:capture_id}", s.release_capture, methods=["DELETE"]),
        Route("/v1/activations/{capture_id:capture_id}/release", s.release_capture, methods=["POST"]),
        Route("/v1/activations/{capture_id:capture_id}/logit_lens", viz.logit_lens, methods=["POST"]),
        Route("/v1/vectors", s.create_vector, methods=["POST"]),
        Route("/v1/vectors", s.list_vectors, methods=["GET"]),
        Route("/v1/vectors/{vector_id:vector_id}", s.get_vector, methods=["GET"]),
        Route("/v1/vectors/{vector_id:vector_id}", s.delete_vector, methods=["DELETE"]),
        Route("/v1/vectors/{vector_id:vector_id}/delete", s.delete_vector, methods=["POST"]),
        Route("/v1/harvest", s.harvests.harvest, methods=["POST"]),
        Route("/v1/harvest", s.harvests.list_harvests, methods=["GET"]),
        Route("/v1/harvest/{job_id:job_id}", s.harvests.harvest_status, methods=["GET"]),
        Route("/v1/harvest/{job_id:job_id}", s.harvests.cancel_harvest, methods=["DELETE"]),
        Route("/v1/harvest/{job_id:job_id}/cancel", s.harvests.cancel_harvest, methods=["POST"]),
        Route("/viz", viz.page, methods=["GET"], include_in_schema=False),
        Route("/viz/{name}", viz.asset, methods=["GET"], include_in_schema=False),
    ]
    return table


def create_app(config: AppConfig, service: ModelService | None = None, registry: ShmRegistry | None = None) -> Starlette:
    service = service or ModelService(config.service)
    registry = registry or ShmRegistry(state_dir=config.state_dir, budget_bytes=config.shm_budget_bytes,
                                       ttl_s=config.shm_ttl_s)
    delivery = Delivery(registry, config.shm_ttl_s)
    server = Server(config, service, delivery)
    middleware = security_middleware(SecurityConfig(
        allowed_hosts=config.allowed_hosts, bound_host=config.bound_host, cors_origins=config.cors_origins,
        max_body_bytes=config.max_body_bytes, api_key=config.api_key))

    async def reaper():
        while True:
            await asyncio.sleep(5)
            registry.reap_expired()

    @contextlib.asynccontextmanager  # a bare async generator is deprecated in Starlette
    async def lifespan(app):
        task = asyncio.create_task(reaper())
        yield
        task.cancel()
        service.shutdown()
        registry.close()

    app = Starlette(
        routes=routes(server),
        middleware=middleware,
        exception_handlers={HTTPError: _handle_error, EngineError: _handle_engine_error, HTTPException: _handle_http,
                            Exception: _handle_unexpected},
        lifespan=lifespan,
    )
    app.state.server = server
    return app
