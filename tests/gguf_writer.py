"""A minimal GGUF writer for tests (version 3, little-endian), so tests can make GGUF files
without the `gguf` package: string/int/float metadata and float32/float16 tensors.

    write_gguf(path, {"general.architecture": "controlvector"}, {"direction.1": np.ones(64, np.float32)})
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

ALIGNMENT = 32
_GGML_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(v) -> bytes:
    """A typed metadata value: str -> string (8), bool -> bool (7), int -> uint32 (4) or int64 (11),
    float -> float32 (6)."""
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, bool):
        return struct.pack("<IB", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v) if 0 <= v < 2**32 else struct.pack("<Iq", 11, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    raise TypeError(f"unsupported metadata value {v!r}")


def gguf_bytes(metadata: dict, tensors: dict[str, np.ndarray], version: int = 3) -> bytes:
    """The bytes of a GGUF file. Tensor dims are written in GGUF's order (fastest-varying first)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _string(key) + _value(value)
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        out += _string(name) + struct.pack("<I", array.ndim)
        out += b"".join(struct.pack("<Q", d) for d in reversed(array.shape))
        out += struct.pack("<IQ", _GGML_TYPES[array.dtype], offset)
        blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
        blob += b"\0" * (-len(blob) % ALIGNMENT)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % ALIGNMENT)
    for blob in blobs:
        out += blob
    return bytes(out)


def write_gguf(path: str | Path, metadata: dict, tensors: dict[str, np.ndarray], version: int = 3) -> Path:
    path = Path(path)
    path.write_bytes(gguf_bytes(metadata, tensors, version))
    return path


def controlvector_bytes(directions: dict[int, np.ndarray], model_hint: str = "llama", **extra) -> bytes:
    """A llama.cpp control vector (as repeng and llama.cpp's cvector-generator write it)."""
    metadata = {"general.architecture": "controlvector", "controlvector.model_hint": model_hint,
                "controlvector.layer_count": len(directions), **extra}
    return gguf_bytes(metadata, {f"direction.{n}": np.asarray(v, np.float32) for n, v in directions.items()})
