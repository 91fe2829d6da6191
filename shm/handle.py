"""The handle a client receives for a capture stored in shared memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The bytes a handle points at are one Arrow IPC *stream* (media type
# application/vnd.apache.arrow.stream), not the IPC file format.
HANDLE_FORMAT = "arrow-ipc-stream"


@dataclass(frozen=True)
class ShmHandle:
    """`name` opens with `SharedMemory(name=...)` (`/dev/shm/<name>` on Linux); the Arrow
    IPC stream lies at `offset .. offset + byte_size` (a reused segment can be larger)."""

    name: str
    offset: int
    byte_size: int
    format: str
    capture_id: str
    expires_at: float  # Unix time (seconds) after which the server may drop the segment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShmHandle":
        return cls(
            name=str(d["name"]),
            offset=int(d.get("offset", 0)),
            byte_size=int(d["byte_size"]),
            format=str(d.get("format", HANDLE_FORMAT)),
            capture_id=str(d["capture_id"]),
            expires_at=float(d.get("expires_at", 0.0)),
        )
