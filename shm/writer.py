"""A capture -> one Arrow IPC stream, written straight into a shared-memory segment.

A capture crosses into the data plane as plain values; the writer reads them by attribute
and never imports the engine (engine.records' dataclasses are one such shape):

    capture: capture_id (str), model_id (str), token_ids (list[int]), tokens (list[str]),
             prompt_tokens (int), hooks (list of hooks, one column each, in order)
    hook:    hook_id, layer_name, module_path (str), layer_index (int | None),
             component (a name in vocabulary.COMPONENTS), is_input (bool),
             dtype ("float32" | "float16" | "bfloat16"), steps (list, in step order)
    step:    step (int, 0 = the prompt), start (position of its first token),
             array (numpy or MLX, tokens on vocabulary.COMPONENTS[component].token_axis)

Each captured array is copied exactly once, from MLX memory to its final place in the
stream. pyarrow serialises the stream's framing (schema, batch header, the small row
columns) while each hook's values buffer is a *placeholder*: a sink that records pyarrow's
writes notes where that buffer lands, which also gives the exact stream size before any
segment is taken. The framing bytes are then replayed into the segment and every step's
array is copied into its rows (`shm.format.stack_token_major`: transposed token-major,
attention keys padded, in the same single pass).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from shm.format import (
    LOGICAL_DTYPE,
    STORAGE,
    ROW_FIELDS,
    capture_metadata,
    column_names,
    hook_field,
    stack_token_major,
    to_numpy,
)
from shm.handle import ShmHandle
from shm.lifecycle import ShmRegistry
from vocabulary import COMPONENTS


@dataclass
class _Hook:
    record: Any  # a hook as the module docstring describes it
    arrays: list[np.ndarray]  # per step, views of MLX memory in the record's own layout
    dtype: str  # logical
    shape: tuple[int, ...]  # per token, token-major
    nbytes: int
    layout: list[tuple[int, int, int]]  # (step, start, n_tokens) per step


@dataclass
class Plan:
    """Everything about a capture's stream except the tensor bytes."""

    schema: pa.Schema
    hooks: list[_Hook]
    n_rows: int
    size: int  # exact stream length in bytes
    chunks: list[tuple[int, bytearray | int]]  # (offset, framing bytes) or (offset, hook index)


def _logical_dtype(record: Any, arr: np.ndarray) -> str:
    name = LOGICAL_DTYPE.get(arr.dtype)  # to_numpy gives bfloat16 as its uint16 bits
    if name is None or (name == "bfloat16" and record.dtype != "bfloat16"):
        raise ValueError(f"hook {record.hook_id!r}: unsupported array dtype {arr.dtype} for {record.dtype}")
    return name


def _eval_mlx(capture: Any) -> None:
    """Evaluate all pending MLX arrays in one call rather than one graph at a time."""
    pending = [s.array for h in capture.hooks for s in h.steps if type(s.array).__module__.startswith("mlx")]
    if pending:
        import mlx.core as mx

        mx.eval(*pending)


def _rows(hooks: list[_Hook]) -> tuple[np.ndarray, np.ndarray]:
    """The `step` and `position` of every row, from the first hook; all hooks must agree."""
    if not hooks:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    layout = hooks[0].layout
    for h in hooks[1:]:
        if h.layout != layout:
            raise ValueError(
                f"hook {h.record.hook_id!r} covers different steps/tokens than hook "
                f"{hooks[0].record.hook_id!r}; every hook of a capture must see the same forward passes"
            )
    steps = np.concatenate([np.full(n, step, np.int32) for step, _, n in layout])
    pos = np.concatenate([np.arange(start, start + n, dtype=np.int32) for _, start, n in layout])
    return steps, pos


def _hook_plan(record: Any) -> _Hook:
    """Numpy views of every step (no copy) and the per-token shape, validated."""
    arrays = [to_numpy(s.array) for s in record.steps]
    if not arrays:
        raise ValueError(f"hook {record.hook_id!r} captured no steps")
    comp = COMPONENTS.get(record.component)
    if comp is None:
        raise ValueError(f"hook {record.hook_id!r}: unknown component {record.component!r}; "
                         f"valid: {', '.join(COMPONENTS)}")
    ndim = 1 + len(comp.sizes)
    axis = comp.token_axis
    dtype = _logical_dtype(record, arrays[0])
    shapes = {(a.shape, a.dtype) for a in arrays}  # decode steps share one shape: cheap check
    if any(len(sh) != ndim for sh, _ in shapes):
        raise ValueError(f"hook {record.hook_id!r} ({record.component}): expected {ndim}-d arrays, got {sorted(shapes)}")
    if len({dt for _, dt in shapes}) != 1:
        raise ValueError(f"hook {record.hook_id!r}: dtype changes between steps")
    rests = {sh[:axis] + sh[axis + 1 :] for sh, _ in shapes}
    if comp.key_pad is not None:  # the key axis grows per step: pad to the longest
        if len({r[:-1] for r in rests}) != 1:
            raise ValueError(f"hook {record.hook_id!r}: head count changes between steps")
        rest = next(iter(rests))[:-1] + (max(r[-1] for r in rests),)
    elif len(rests) != 1:
        raise ValueError(f"hook {record.hook_id!r}: per-token shape changes between steps ({sorted(rests)})")
    else:
        rest = next(iter(rests))
    layout = [(s.step, s.start, a.shape[axis]) for s, a in zip(record.steps, arrays)]
    n_rows = sum(n for _, _, n in layout)
    nbytes = n_rows * math.prod(rest) * STORAGE[dtype][0].itemsize
    return _Hook(record, arrays, dtype, rest, nbytes, layout)


def stored_shape(record: Any) -> tuple[int, ...]:
    """The hook's array as the stream stores it: (rows, *per-token shape), token-major, keys padded."""
    hook = _hook_plan(record)
    return (sum(n for _, _, n in hook.layout), *hook.shape)


class _RecordingSink:
    """A pyarrow output 'file' that keeps framing bytes and only notes placeholder buffers."""

    def __init__(self, placeholders: dict[int, int]) -> None:
        self.placeholders = placeholders  # buffer address -> hook index
        self.chunks: list[tuple[int, bytearray | int]] = []
        self.pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        n = data.size if isinstance(data, pa.Buffer) else len(data)
        hook = self.placeholders.pop(data.address, None) if isinstance(data, pa.Buffer) else None
        if hook is not None:
            self.chunks.append((self.pos, hook))
        elif n:
            last = self.chunks[-1] if self.chunks else None
            if last is not None and isinstance(last[1], bytearray):  # adjacent framing: one copy later
                last[1].extend(data)
            else:
                self.chunks.append((self.pos, bytearray(data)))
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


_KEY = ("hook_id", "layer_name", "module_path", "layer_index", "component", "is_input", "dtype", "shape", "name")


def _field_key(h: _Hook, name: str) -> tuple[Any, ...]:
    r = h.record
    return (r.hook_id, r.layer_name, r.module_path, r.layer_index, r.component, r.is_input, h.dtype, h.shape, name)


@functools.lru_cache(maxsize=256)
def _base_schema(keys: tuple[tuple[Any, ...], ...]) -> pa.Schema:
    return pa.schema(ROW_FIELDS + [hook_field(**dict(zip(_KEY, k))) for k in keys])


def plan_capture(capture: Any) -> Plan:
    """Lay out the stream: exact size, framing bytes and where each hook's values go."""
    _eval_mlx(capture)
    hooks = [_hook_plan(h) for h in capture.hooks]
    steps, positions = _rows(hooks)
    n_rows = len(steps)
    # Hooks repeat from request to request: build their schema once (pa.Field equality
    # ignores metadata, so the cache is keyed on the plain values).
    names = column_names([(h.record.hook_id, h.record.is_input) for h in hooks])
    base = _base_schema(tuple(_field_key(h, n) for h, n in zip(hooks, names)))
    schema = base.with_metadata(
        capture_metadata(
            capture_id=capture.capture_id,
            model_id=capture.model_id,
            token_ids=capture.token_ids,
            tokens=capture.tokens,
            prompt_tokens=capture.prompt_tokens,
        )
    )
    fields = [schema.field(i + len(ROW_FIELDS)) for i in range(len(hooks))]
    # Placeholders: distinct addresses in untouched (never faulted) virtual memory; pyarrow
    # only passes them to the sink, which never reads them.
    arena = np.empty(max(sum(h.nbytes for h in hooks), 1), np.uint8)
    placeholders: dict[int, int] = {}
    columns: list[pa.Array] = []
    ids = np.asarray(capture.token_ids, dtype=np.int64)
    token_id = np.full(n_rows, -1, np.int32)  # -1: a position past the recorded tokens
    known = positions < len(ids)
    token_id[known] = ids[positions[known]]
    for col in (steps, positions, token_id):
        columns.append(pa.array(col, type=pa.int32()))
    at = 0
    for i, (h, f) in enumerate(zip(hooks, fields)):
        per = math.prod(h.shape)
        buf = pa.foreign_buffer(arena.ctypes.data + at, h.nbytes, base=arena)
        if h.nbytes:
            placeholders[buf.address] = i
        at += h.nbytes
        child = pa.Array.from_buffers(STORAGE[h.dtype][1], n_rows * per, [None, buf], null_count=0)
        storage = pa.FixedSizeListArray.from_arrays(child, per)
        columns.append(pa.ExtensionArray.from_storage(f.type, storage))
    sink = _RecordingSink(placeholders)
    with pa.ipc.new_stream(sink, schema) as w:
        if n_rows:
            w.write_batch(pa.record_batch(columns, schema=schema))
    if sink.placeholders:  # pyarrow wrote a values buffer some other way: refuse, don't guess
        raise RuntimeError("pyarrow did not write the hook buffers as expected")
    return Plan(schema, hooks, n_rows, sink.pos, sink.chunks)


def _fill_hook(dst: np.ndarray, hook: _Hook, n_rows: int) -> None:
    """Copy every step of one hook into its [rows, *shape] values buffer (`dst`, uint8)."""
    out = dst.view(STORAGE[hook.dtype][0]).reshape((n_rows, *hook.shape))
    stack_token_major(hook.record.component, hook.arrays, out=out)


def write_plan(plan: Plan, dst: np.ndarray) -> None:
    """Write the planned stream into `dst` (a uint8 array of at least `plan.size` bytes)."""
    if dst.nbytes < plan.size:
        raise ValueError("destination smaller than the stream")
    for offset, item in plan.chunks:
        if isinstance(item, bytearray):
            dst[offset : offset + len(item)] = np.frombuffer(item, np.uint8)
        else:
            hook = plan.hooks[item]
            _fill_hook(dst[offset : offset + hook.nbytes], hook, plan.n_rows)


def write_capture(capture: Any, registry: ShmRegistry, ttl_s: float | None = None) -> ShmHandle:
    """Store `capture` in a shared-memory segment owned by `registry` and return its handle.
    Raises `CaptureBudgetExceeded` (nothing is written) when it does not fit."""
    plan = plan_capture(capture)
    lease = registry.acquire(plan.size, capture.capture_id, ttl_s=ttl_s)
    try:
        seg = lease.segment.array()
        write_plan(plan, seg[lease.offset : lease.offset + plan.size])
    except BaseException:
        registry.abort(lease)
        raise
    return registry.commit(lease, plan.size)


def capture_to_bytes(capture: Any) -> pa.Buffer:
    """The same stream in ordinary memory (for HTTP or a file)."""
    plan = plan_capture(capture)
    buf = pa.allocate_buffer(max(plan.size, 1))
    write_plan(plan, np.frombuffer(buf, np.uint8))
    return buf.slice(0, plan.size)
