"""Arrow IPC in named shared memory: the zero-copy data plane for captured activations.

Server side: `ShmRegistry` (once at start), `write_capture(capture, registry) -> ShmHandle`,
`registry.release(capture_id)`, `registry.status()`. Client side: `open_capture(handle)`,
`read_capture_bytes(data)`. Nothing here imports MLX or the engine: a capture crosses in as
plain values (the protocol is in shm/writer.py) and the vocabulary comes from vocabulary.py.
"""

from shm.format import FORMAT_VERSION
from shm.handle import HANDLE_FORMAT, ShmHandle
from shm.lifecycle import CaptureBudgetExceeded, ShmRegistry, UnknownSegment
from shm.reader import CaptureView, HookArray, StaleHandle, open_capture, read_capture_bytes
from shm.segments import ShmSpaceError
from shm.writer import capture_to_bytes, plan_capture, write_capture

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

