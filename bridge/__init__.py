"""The bridge: the Python client of the activation server, the conversion into NeuroScope's
format, file export, and (bridge.smalltalk) the Smalltalk client generator.

    from bridge import LMStudioNeuroScopeClient, NeuroScopeActivationBridge
"""

from typing import Any

from bridge.client import (
    DEFAULT_BASE_URL,
    ActivationResult,
    ActivationStream,
    AttributionResult,
    ChatCompletion,
    ChatStream,
    LMStudioNeuroScopeClient,
    NeuroScopeConnectionError,
    NeuroScopeError,
    NeuroScopeServerError,
    PatchingResult,
    ShmCapture,
    StreamEvent,
    entry_array,
)
from bridge.export import load_any, load_capture, load_neuroscope, save_capture
from bridge.neuroscope import FORMAT as NEUROSCOPE_FORMAT
from bridge.neuroscope import NeuroScopeActivationBridge, from_jsonable, to_jsonable, to_neuroscope

__all__ = [
    "DEFAULT_BASE_URL",
    "NEUROSCOPE_FORMAT",
    "ActivationResult",
    "ActivationStream",
    "AttributionResult",
    "ChatCompletion",
    "ChatStream",
    "LMStudioNeuroScopeClient",
    "NeuroScopeActivationBridge",
    "NeuroScopeConnectionError",
    "NeuroScopeError",
    "NeuroScopeServerError",
    "PatchingResult",
    "ShmCapture",
    "StreamEvent",
    "entry_array",
    "from_jsonable",
    "load_any",
    "load_capture",
    "load_neuroscope",
    "save_capture",
    "to_jsonable",
    "to_neuroscope",
]


def __getattr__(name: str) -> Any:
    # The Smalltalk generator lives in bridge.smalltalk (written separately); import on use.
    if name == "generate_neuroscope_smalltalk_interface":
        from bridge.smalltalk import generate_neuroscope_smalltalk_interface

        return generate_neuroscope_smalltalk_interface
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
