"""Typed errors. Each carries the HTTP status and OpenAI-style `type`/`code` the control plane answers with."""

from __future__ import annotations


class NSBridgeError(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(NSBridgeError):
    """A field has an invalid value (wrong type, out of range, empty)."""

    status = 422
    code = "invalid_value"


class MalformedRequest(NSBridgeError):
    """The body is not JSON, or not an object."""

    status = 400
    code = "malformed_request"


class ModelNotFound(NSBridgeError):
    status = 404
    code = "model_not_found"


class ModelLoadError(NSBridgeError):
    """The path exists but does not hold a loadable model."""

    status = 400
    code = "model_load_failed"


class UnsupportedArchitecture(ModelLoadError):
    code = "unsupported_architecture"


class ModelPathForbidden(NSBridgeError):
    status = 403
    type = "permission_error"
    code = "model_path_forbidden"


class NoModelLoaded(NSBridgeError):
    status = 409
    type = "conflict_error"
    code = "no_model_loaded"


class ContextLengthExceeded(NSBridgeError):
    code = "context_length_exceeded"


class UnknownHook(NSBridgeError):
    """An activation hook names a layer or component the loaded model does not have."""

    code = "unknown_hook"


class CaptureTooLarge(NSBridgeError):
    status = 413
    code = "capture_too_large"


class NotFound(NSBridgeError):
    status = 404
    code = "not_found"


class Busy(NSBridgeError):
    status = 503
    type = "server_busy"
    code = "queue_full"
