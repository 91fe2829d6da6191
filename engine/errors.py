"""The engine's errors: what went wrong, in the engine's own terms.

`arg` names the engine argument at fault as a path (`max_tokens`, `messages[0].content`,
`hooks[2].layer_name`), or None. The engine knows nothing of HTTP: control/errors.py maps
these classes to status codes and request field names.
"""

from __future__ import annotations


class EngineError(Exception):
    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.message = message
        self.arg = arg


class InvalidArgument(EngineError):
    """An argument has an invalid value (wrong type, out of range, empty)."""


class UnknownHook(InvalidArgument):
    """A hook names a layer or component the loaded model does not have."""


class UnknownVector(InvalidArgument):
    """No stored vector has that id (never made, deleted, or dropped when another model loaded)."""


class ContextLengthExceeded(InvalidArgument):
    """The prompt, or the prompt plus max_tokens, does not fit in the model's context."""


class CaptureTooLarge(EngineError):
    """A capture would exceed the budget it was given."""


class ModelNotFound(EngineError):
    pass


class ModelLoadError(EngineError):
    """The path exists but does not hold a loadable model."""


class UnsupportedArchitecture(ModelLoadError):
    pass
