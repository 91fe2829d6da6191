"""Consumer API: open a capture from a shared-memory handle (zero-copy) or from bytes.

    with open_capture(handle) as cap:
        resid = cap["resid_5"].data          # np.ndarray [rows, d_model], aliases the segment
        cap.step, cap.position               # which step / sequence position each row is
        first = cap["pattern_3"].for_step(1) # [T_q, H, T_k] of decode step 1, padding cut off

Arrays alias the mapping and are read-only. Use them only inside the `with` block: once the
client releases the capture the server may reuse the segment for another one. (Python keeps
the mapping itself alive while any view exists, so a stray view never crashes, but its
contents are no longer guaranteed.) Copy (`np.array(x)`) what you keep.
Needs only numpy, pyarrow and this package; attaching never registers the segment with
multiprocessing's resource tracker, so a reader exiting never unlinks the producer's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from shm.format import (
    POSITION,
    RESERVED_COLUMNS,
    STEP,
    TOKEN_ID,
    CaptureInfo,
    HookInfo,
    bfloat16_to_float32,
    parse_field,
    parse_schema,
)
from shm.handle import HANDLE_FORMAT, ShmHandle
from shm.segments import Segment


class StaleHandle(RuntimeError):
    """The segment no longer holds the capture the handle names (released and reused)."""


@dataclass
class HookArray:
    column: str  # the column name: the hook_id, or `<id>:input` when one id is captured twice
    info: HookInfo
    data: np.ndarray  # [rows, *info.shape]; bfloat16 as uint16 bits
    step: np.ndarray  # [rows] int32, shared with the capture
    position: np.ndarray  # [rows] int32

    @property
    def hook_id(self) -> str:
        return self.info.hook_id

    @property
    def component(self) -> str:
        return self.info.component

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def rows(self, step: int) -> slice:
        """The rows of one step (rows are in step order, so this is a slice, not a mask)."""
        lo, hi = np.searchsorted(self.step, [step, step + 1])
        return slice(int(lo), int(hi))

    def for_step(self, step: int) -> np.ndarray:
        """This step's tensor, token-major ([T_q, ...]); scores/patterns trimmed to the
        step's keys ([T_q, H, last position + 1]). A view, no copy."""
        r = self.rows(step)
        out = self.data[r]
        if self.info.key_pad is not None and r.stop > r.start:
            out = out[..., : int(self.position[r.stop - 1]) + 1]
        return out

    def to_float32(self) -> np.ndarray:
        """The data as float32 (a copy; decodes bfloat16 bits exactly)."""
        if self.info.dtype == "bfloat16":
            return bfloat16_to_float32(self.data)
        return self.data.astype(np.float32)


class CaptureView:
    """One capture's table and per-hook arrays. A context manager: closing drops every view
    it made and unmaps the segment."""

    def __init__(self, table: pa.Table, segment: Segment | None = None) -> None:
        self._segment = segment
        self.table: pa.Table | None = table
        self.info: CaptureInfo = parse_schema(table.schema)
        self.step = _int_column(table, STEP)
        self.position = _int_column(table, POSITION)
        self.token_id = _int_column(table, TOKEN_ID)
        self.hooks: dict[str, HookArray] = {}
        for field in table.schema:
            if field.name in RESERVED_COLUMNS:
                continue
            info = parse_field(field)
            data = _tensor_column(table, field.name, info)
            self.hooks[field.name] = HookArray(field.name, info, data, self.step, self.position)

    @property
    def capture_id(self) -> str:
        return self.info.capture_id

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def tokens(self) -> list[str]:
        return self.info.tokens

    @property
    def token_ids(self) -> list[int]:
        return self.info.token_ids

    @property
    def prompt_tokens(self) -> int:
        return self.info.prompt_tokens

    @property
    def segment(self) -> Segment | None:
        """The mapped segment (None when read from bytes or after close)."""
        return self._segment

    def __getitem__(self, column: str) -> HookArray:
        """A hook by column name (its hook_id unless the id was captured as input and output)."""
        return self.hooks[column]

    def entries(self, hook_id: str) -> list[HookArray]:
        """Every array captured for `hook_id` (output and/or input), like the JSON contract's
        `activations[hook_id]` list."""
        return [h for h in self.hooks.values() if h.info.hook_id == hook_id]

    def __iter__(self) -> Iterator[HookArray]:
        return iter(self.hooks.values())

    def __len__(self) -> int:
        return len(self.hooks)

    def close(self) -> None:
        """Drop our views, then unmap (left to the garbage collector if the caller still
        holds views)."""
        self.hooks = {}
        self.table = None
        self.step = self.position = self.token_id = np.zeros(0, np.int32)
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def __enter__(self) -> "CaptureView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=True)
    return col.to_numpy()  # several batches (not written by us): a copy


def _tensor_column(table: pa.Table, name: str, info: HookInfo) -> np.ndarray:
    col = table.column(name)
    if col.num_chunks == 1:  # what our writer produces: zero-copy
        arr = col.chunk(0)
    elif col.num_chunks == 0:
        arr = pa.ExtensionArray.from_storage(col.type, pa.array([], type=col.type.storage_type))
    else:
        arr = col.combine_chunks()
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    flat = storage.flatten().to_numpy(zero_copy_only=True)  # flatten() honours slice offsets
    return flat.reshape((len(arr), *info.shape))


def read_table(source: Any) -> pa.Table:
    """Read an Arrow IPC stream from a buffer-like object without copying its buffers."""
    buf = source if isinstance(source, pa.Buffer) else pa.py_buffer(source)
    return pa.ipc.open_stream(pa.BufferReader(buf)).read_all()


def read_capture_bytes(data: Any) -> CaptureView:
    """A capture from stream bytes fetched elsewhere (bytes, memoryview, pa.Buffer); the
    arrays alias `data`."""
    return CaptureView(read_table(data))


def open_capture(handle: ShmHandle | dict[str, Any]) -> CaptureView:
    """Map a capture's segment read-only and read it in place (zero-copy)."""
    h = handle if isinstance(handle, ShmHandle) else ShmHandle.from_dict(handle)
    if h.format != HANDLE_FORMAT:
        raise ValueError(f"unsupported handle format {h.format!r}")
    seg = Segment.attach(h.name)
    try:
        if h.offset < 0 or h.offset + h.byte_size > seg.size:
            raise ValueError(f"handle points past the end of segment {h.name}")
        try:
            view = read_capture_bytes(pa.py_buffer(seg.mmap).slice(h.offset, h.byte_size))
        except pa.ArrowInvalid as exc:
            raise StaleHandle(f"segment {h.name} no longer holds capture {h.capture_id!r} (released)") from exc
        if view.capture_id != h.capture_id:
            view.close()
            raise StaleHandle(f"segment {h.name} now holds capture {view.capture_id!r}, not {h.capture_id!r}")
    except BaseException:
        seg.close()
        raise
    view._segment = seg
    return view
