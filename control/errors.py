"""Errors as HTTP answers: status codes, OpenAI-style error JSON and request field names.

The body is OpenAI's: `{"error": {"message", "type", "param", "code"}}`, and an invalid
parameter is a 400 `invalid_request_error`, so the `openai` package raises `BadRequestError`.
Engine errors (engine/errors.py) name engine arguments; `param` renames them to the request
field the client wrote (`hooks[2].layer_name` is `activation_hooks[2].layer_name` in a chat
request).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from engine import errors as engine_errors


class HTTPError(Exception):
    """An error the control plane raises itself."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class MalformedRequest(HTTPError):
    """The body is not JSON, or not an object."""

    code = "malformed_request"


class InvalidRequest(HTTPError):
    """A field the control plane checks itself (e.g. a server-wide cap) is out of range."""

    code = "invalid_value"


class NotFound(HTTPError):
    status = 404
    code = "not_found"


class ModelPathForbidden(HTTPError):
    status = 403
    type = "permission_error"
    code = "model_path_forbidden"


class NoModelLoaded(HTTPError):
    status = 409
    type = "conflict_error"
    code = "no_model_loaded"


class CaptureTooLarge(HTTPError):
    status = 413
    code = "capture_too_large"


class Busy(HTTPError):
    status = 503
    type = "server_busy"
    code = "queue_full"


# Engine error class -> (status, type, code); the most specific class wins (MRO order).
ENGINE_ERRORS: dict[type, tuple[int, str, str]] = {
    engine_errors.UnknownHook: (400, "invalid_request_error", "unknown_hook"),
    engine_errors.UnknownVector: (404, "invalid_request_error", "vector_not_found"),
    engine_errors.ContextLengthExceeded: (400, "invalid_request_error", "context_length_exceeded"),
    engine_errors.InvalidArgument: (400, "invalid_request_error", "invalid_value"),
    engine_errors.CaptureTooLarge: (413, "invalid_request_error", "capture_too_large"),
    engine_errors.ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    engine_errors.UnsupportedArchitecture: (400, "invalid_request_error", "unsupported_architecture"),
    engine_errors.ModelLoadError: (400, "invalid_request_error", "model_load_failed"),
    engine_errors.EngineError: (500, "server_error", "engine_error"),
}


def rename_param(arg: str | None, fields: dict[str, str] | None) -> str | None:
    """An engine argument path in the request's words: {'hooks': 'activation_hooks'} turns
    'hooks[2].layer_name' into 'activation_hooks[2].layer_name'."""
    if arg is None or not fields:
        return arg
    for engine_name, field in fields.items():
        if arg == engine_name or arg.startswith((engine_name + "[", engine_name + ".")):
            return field + arg[len(engine_name):]
    return arg


def from_engine(exc: engine_errors.EngineError, fields: dict[str, str] | None = None,
                prefix: str | None = None) -> HTTPError:
    """The HTTP form of an engine error, with its argument renamed to the request's field
    (`fields`), or placed under `prefix` (an argument of one item of a request's list)."""
    status, type_, code = next(ENGINE_ERRORS[c] for c in type(exc).__mro__ if c in ENGINE_ERRORS)
    param = rename_param(exc.arg, fields)
    if prefix is not None:
        param = f"{prefix}.{param}" if param else prefix
    err = HTTPError(f"{prefix}: {exc.message}" if prefix else
                    rename_param(exc.message, fields) if exc.arg and exc.message.startswith(exc.arg) else exc.message,
                    param)
    err.status, err.type, err.code = status, type_, code
    return err


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_dict(exc: HTTPError) -> dict:
    return error_body(exc.message, exc.type, exc.code, exc.param)


def error_response(exc: HTTPError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(to_dict(exc), status_code=exc.status, headers=headers)
