"""The OpenAPI 3.1 document, generated from the route table and the request schemas.

Request bodies are the pydantic models of control/schemas.py (the same ones that validate),
summaries are the handlers' docstrings, so the document cannot drift from the server. Links
tell a client (and schemathesis' stateful phase) that a capture id from a chat response
names a capture at /v1/activations/{capture_id}.
"""

from __future__ import annotations

from pydantic.json_schema import models_json_schema
from starlette.routing import Route

from control.delivery import CAPTURE_ID_PATTERN, VECTOR_ID_PATTERN
from control.harvest import JOB_ID_PATTERN
from control.schemas import (ActivationChatRequest, AttributionRequest, ChatRequest, CreateVectorRequest,
                             HarvestRequest, LoadModelRequest, LogitLensRequest, RegisterHooksRequest)

# handler name -> its request body
BODIES = {
    "load_model": LoadModelRequest,
    "chat": ChatRequest,
    "chat_with_activations": ActivationChatRequest,
    "register_hooks": RegisterHooksRequest,
    "create_vector": CreateVectorRequest,
    "attribution": AttributionRequest,
    "logit_lens": LogitLensRequest,
    "harvest": HarvestRequest,
}
# Path parameters: {name:convertor} in a route -> the id's pattern
_PATH_IDS = {"capture_id": CAPTURE_ID_PATTERN, "vector_id": VECTOR_ID_PATTERN, "job_id": JOB_ID_PATTERN}
_SUCCESS = {"create_vector": "201", "harvest": "202"}  # the others answer 200

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": "string"}}}}}
_COMPLETION = {"type": "object", "required": ["id", "object", "model", "choices"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "model": {"type": "string"},
    "choices": {"type": "array", "items": {"type": "object", "required": ["message", "finish_reason"]}},
    "usage": {"type": "object"}}}
_ACTIVATIONS = {**_COMPLETION, "required": [*_COMPLETION["required"], "activations", "tokens", "token_ids"],
                "properties": {
                    **_COMPLETION["properties"],
                    "activations": {"type": "object", "additionalProperties": {"type": "array"}},
                    "tokens": {"type": "array", "items": {"type": "string"}},
                    "token_ids": {"type": "array", "items": {"type": "integer"}},
                    "capture": {"type": "object", "required": ["capture_id", "handle"],
                                "properties": {"capture_id": {"type": "string"}, "handle": {"type": "object"}}},
                }}
_SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}

# (handler name) -> 200 content
_OK_CONTENT = {
    "chat": {"application/json": {"schema": _COMPLETION}, **_SSE},
    "chat_with_activations": {"application/json": {"schema": _ACTIVATIONS}, **_SSE},
    "get_capture": {"application/vnd.apache.arrow.stream": {"schema": {"type": "string", "format": "binary"}}},
}
# A capture id in a chat response names a capture, a vector id in a new vector's response names
# it (used by clients and by schemathesis' stateful tests).
_LINKS = {
    "chat_with_activations": {
        name: {"operationId": op, "parameters": {"capture_id": "$response.body#/capture/capture_id"}}
        for name, op in (("GetCapture", "get_capture"), ("ReleaseCapture", "release_capture"),
                         ("ReleaseCapturePost", "release_capture_post"))},
    "create_vector": {
        name: {"operationId": op, "parameters": {"vector_id": "$response.body#/vector_id"}}
        for name, op in (("GetVector", "get_vector"), ("DeleteVector", "delete_vector"),
                         ("DeleteVectorPost", "delete_vector_post"))},
}


def openapi_spec(routes: list[Route]) -> dict:
    defs_mapping, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                            ref_template="#/components/schemas/{model}")
    paths: dict = {}
    seen: set[str] = set()
    for route in routes:
        if not route.include_in_schema:  # the viewer's page and files (GET /viz)
            continue
        name = route.endpoint.__name__
        path = route.path
        for param in _PATH_IDS:
            path = path.replace(f"{{{param}:{param}}}", f"{{{param}}}")
        for method in sorted(route.methods - {"HEAD"}):
            op_id = name if name not in seen else f"{name}_{method.lower()}"
            seen.add(op_id)
            ok: dict = {"description": "OK", "content": _OK_CONTENT.get(name, {"application/json": {
                "schema": {"type": "object"}}})}
            if name in _LINKS:
                ok["links"] = _LINKS[name]
            op: dict = {
                "operationId": op_id,
                "summary": (route.endpoint.__doc__ or name).strip().splitlines()[0],
                "responses": {
                    _SUCCESS.get(name, "200"): ok,
                    "4XX": {"description": "Invalid request (OpenAI error shape)",
                            "content": {"application/json": {"schema": _ERROR}}},
                    "503": {"description": "Queue full; retry after the Retry-After seconds",
                            "content": {"application/json": {"schema": _ERROR}}},
                },
            }
            op["parameters"] = [{"name": param, "in": "path", "required": True,
                                 "schema": {"type": "string", "pattern": pattern}}
                                for param, pattern in _PATH_IDS.items() if f"{{{param}}}" in path]
            if not op["parameters"]:
                del op["parameters"]
            if name in BODIES:
                ref = defs_mapping[(BODIES[name], "validation")]
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "nsbridge", "version": "0.2.0",
                 "description": "Activation-capture server for MLX language models"},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
