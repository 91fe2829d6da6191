"""The OpenAPI description of the server, built from the route table so it cannot drift."""

from __future__ import annotations

from starlette.routing import Route

from engine.hooks import COMPONENTS, DTYPES, POSITIONS

_HOOK = {
    "type": "object",
    "required": ["layer_name"],
    "properties": {
        "layer_name": {"type": "string", "example": "transformer.h.5"},
        "component": {"type": "string", "enum": list(COMPONENTS)},
        "hook_id": {"type": "string"},
        "capture_input": {"type": "boolean", "default": False},
        "capture_output": {"type": "boolean", "default": True},
    },
}
_MESSAGES = {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}}
_CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": _MESSAGES,
        "max_tokens": {"type": "integer", "minimum": 1, "default": 256},
        "temperature": {"type": "number", "minimum": 0, "default": 1.0},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},  # OpenAPI 3.0 form
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    },
}
_CHAT_ACT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **_CHAT["properties"],
        "activation_hooks": {"type": "array", "items": _HOOK},
        "activations_transport": {"type": "string", "enum": ["inline", "shm"], "default": "inline"},
        "activations_encoding": {"type": "string", "enum": ["json", "base64"], "default": "json"},
        "activation_positions": {"type": "string", "enum": list(POSITIONS)},
        "activation_dtype": {"type": "string", "enum": list(DTYPES)},
    },
}
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
    "code": {"type": "string"}}}}}

# (path, method) -> (summary, request body schema or None)
OPERATIONS = {
    ("/health", "GET"): ("Liveness, loaded model, BLAS in use", None),
    ("/openapi.json", "GET"): ("This description", None),
    ("/v1/models", "GET"): ("The loaded model (OpenAI list format)", None),
    ("/v1/models/load", "POST"): ("Load a model (replaces the current one)", {
        "type": "object", "required": ["model_path"],
        "properties": {"model_path": {"type": "string"}, "model_id": {"type": "string"}}}),
    ("/v1/chat/completions", "POST"): ("OpenAI chat completions (stream with SSE)", _CHAT),
    ("/v1/chat/completions/with_activations", "POST"): ("Chat plus captured activations", _CHAT_ACT),
    ("/v1/activations/hooks", "POST"): ("Register hooks used by later requests that name none", {
        "type": "object", "required": ["hooks"], "properties": {"hooks": {"type": "array", "items": _HOOK}}}),
    ("/v1/activations/hooks", "GET"): ("List registered hooks", None),
    ("/v1/activations/hooks", "DELETE"): ("Clear registered hooks", None),
    ("/v1/activations/hooks/clear", "POST"): ("Clear registered hooks (POST twin for SqueakJS)", None),
    ("/v1/activations/points", "GET"): ("Every hook point of the loaded model", None),
    ("/v1/activations", "GET"): ("Live shared-memory captures", None),
    ("/v1/activations/{capture_id}", "GET"): ("A capture's Arrow IPC stream", None),
    ("/v1/activations/{capture_id}", "DELETE"): ("Release a capture", None),
    ("/v1/activations/{capture_id}/release", "POST"): ("Release a capture (POST twin for SqueakJS)", None),
}


def openapi_spec(routes: list[Route]) -> dict:
    paths: dict = {}
    for route in routes:
        for method in sorted(route.methods - {"HEAD"}):
            summary, body = OPERATIONS[(route.path, method)]
            op: dict = {
                "summary": summary,
                "responses": {
                    "200": {"description": "OK"},
                    "4XX": {"description": "Error", "content": {"application/json": {"schema": _ERROR}}},
                },
            }
            if "{capture_id}" in route.path:
                op["parameters"] = [{"name": "capture_id", "in": "path", "required": True,
                                     "schema": {"type": "string"}}]
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
            paths.setdefault(route.path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "nsbridge", "version": "0.1.0",
                 "description": "Activation-capture server for MLX language models"},
        "paths": paths,
    }
