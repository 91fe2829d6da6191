"""Arrow IPC in named shared memory: the zero-copy data plane for captured activations.

Server side: `ShmRegistry` (once at start), `write_capture(capture, registry) -> ShmHandle`,
`registry.release(capture_id)`, `registry.status()`. Client side: `open_capture(handle)`,
`read_capture_bytes(data)`. The reader half imports neither MLX nor the engine.
"""

from typing import Any

from shm.format import FORMAT_VERSION
from shm.handle import HANDLE_FORMAT, ShmHandle
from shm.lifecycle import CaptureBudgetExceeded, ShmRegistry, UnknownSegment
from shm.reader import CaptureView, HookArray, StaleHandle, open_capture, read_capture_bytes
from shm.segments import ShmSpaceError

__all__ = [
    "FORMAT_VERSION",
    "HANDLE_FORMAT",
    "CaptureBudgetExceeded",
    "CaptureView",
    "HookArray",
    "ShmHandle",
    "ShmRegistry",
    "ShmSpaceError",
    "StaleHandle",
    "UnknownSegment",
    "capture_to_bytes",
    "open_capture",
    "read_capture_bytes",
    "write_capture",
]


def __getattr__(name: str) -> Any:
    # The writer needs the engine (and so MLX); import it only when asked for.
    if name in ("write_capture", "capture_to_bytes", "plan_capture"):
        from shm import writer

        return getattr(writer, name)
    raise AttributeError(name)
