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
array is copied into its rows: as bytes where they already are its rows (runs of one-token
decode steps joined in C, through a temporary of at most about `_JOIN_BYTES` that stays in
cache), else by `shm.format.stack_token_major` (transposed token-major, attention keys
padded, in the same single pass). Per step, the writer only reads attributes: a generation
of many steps costs about what a memcpy of each array costs, and leaves no objects behind
for the garbage collector to scan.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
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
    arrays: list[Any]  # per step, the record's own (evaluated) MLX or numpy arrays
    dtype: str  # logical
    shape: tuple[int, ...]  # per token, token-major
    nbytes: int
    layout: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (steps, starts, n_tokens): one each per step


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
    """Evaluate all pending MLX arrays in one call rather than one graph at a time (mx.eval
    skips numpy arrays, so only each hook's first step is looked at)."""
    if any(h.steps and type(h.steps[0].array).__module__.startswith("mlx") for h in capture.hooks):
        import mlx.core as mx

        mx.eval([s.array for h in capture.hooks for s in h.steps])


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
    step, start, n = (np.array(col, np.int64) for col in layout)
    first_row = np.cumsum(n) - n
    steps = np.repeat(step, n).astype(np.int32)
    pos = (np.arange(n.sum()) + np.repeat(start - first_row, n)).astype(np.int32)
    return steps, pos


_ARRAY, _STEP, _START = (operator.attrgetter(a) for a in ("array", "step", "start"))
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")


def _hook_plan(record: Any) -> _Hook:
    """The per-token shape and the rows of every step, validated. Only the first step is
    viewed through numpy (for its dtype); the others are read by attribute (shape, dtype), in
    C loops (`map`): a long generation has one small array per hook per step, and there a
    numpy view of each cost more than copying it."""
    steps = record.steps
    if not steps:
        raise ValueError(f"hook {record.hook_id!r} captured no steps")
    arrays = list(map(_ARRAY, steps))
    comp = COMPONENTS.get(record.component)
    if comp is None:
        raise ValueError(f"hook {record.hook_id!r}: unknown component {record.component!r}; "
                         f"valid: {', '.join(COMPONENTS)}")
    ndim = 1 + len(comp.sizes)
    axis = comp.token_axis
    dtype = _logical_dtype(record, to_numpy(arrays[0]))
    step_shapes = list(map(_SHAPE, arrays))
    shapes = set(step_shapes)  # decode steps share one shape: cheap check
    if any(len(sh) != ndim for sh in shapes):
        raise ValueError(f"hook {record.hook_id!r} ({record.component}): expected {ndim}-d arrays, got {sorted(shapes)}")
    # MLX and numpy dtypes never compare equal: a list mixing the two asks numpy (which
    # also sees MLX bfloat16 and numpy's uint16 bits as the same storage).
    if len(set(map(_DTYPE, arrays))) != 1 and len({to_numpy(a).dtype for a in arrays}) != 1:
        raise ValueError(f"hook {record.hook_id!r}: dtype changes between steps")
    rests = {sh[:axis] + sh[axis + 1 :] for sh in shapes}
    if comp.key_pad is not None:  # the key axis grows per step: pad to the longest
        if len({r[:-1] for r in rests}) != 1:
            raise ValueError(f"hook {record.hook_id!r}: head count changes between steps")
        rest = next(iter(rests))[:-1] + (max(r[-1] for r in rests),)
    elif len(rests) != 1:
        raise ValueError(f"hook {record.hook_id!r}: per-token shape changes between steps ({sorted(rests)})")
    else:
        rest = next(iter(rests))
    n_tokens = tuple(map(operator.itemgetter(axis), step_shapes))
    layout = (tuple(map(_STEP, steps)), tuple(map(_START, steps)), n_tokens)
    n_rows = sum(n_tokens)
    nbytes = n_rows * math.prod(rest) * STORAGE[dtype][0].itemsize
    return _Hook(record, arrays, dtype, rest, nbytes, layout)


def stored_shape(record: Any) -> tuple[int, ...]:
    """The hook's array as the stream stores it: (rows, *per-token shape), token-major, keys padded."""
    hook = _hook_plan(record)
    return (sum(hook.layout[2]), *hook.shape)


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


# Bytes of steps joined at a time: the temporary stays small enough to be in cache when it
# is copied on, and no more than this (plus one step) is ever held twice.
_JOIN_BYTES = 1 << 20


def _fill_hook(dst: np.ndarray, hook: _Hook, n_rows: int) -> None:
    """Copy every step of one hook into its [rows, *shape] values buffer (`dst`, uint8).

    A step whose bytes already are its rows (tokens on axis 0, or a single token) is copied
    as bytes: runs of such steps are joined by `bytes.join` (one C loop of memcpy, about
    `_JOIN_BYTES` at a time) and copied on in one piece. For many small decode steps the
    per-array overhead, not the bytes, was the cost: a numpy view of each step cost more than
    copying it. Steps whose rows need a transpose (a prefill of Q/K/V), strided views (which
    `bytes.join` refuses) and key-padded components go through `stack_token_major`, which
    transposes and pads as it copies."""
    out = dst.view(STORAGE[hook.dtype][0]).reshape((n_rows, *hook.shape))
    component = hook.record.component
    comp = COMPONENTS[component]
    if comp.key_pad is not None or not hook.nbytes:
        stack_token_major(component, hook.arrays, out=out)
        return
    arrays = hook.arrays
    rows = hook.layout[2]
    row_bytes = hook.nbytes // n_rows
    first_row = list(itertools.accumulate(rows, initial=0))  # of each step, and the end
    others = [i for i, n in enumerate(rows) if n != 1] if comp.token_axis else []  # to transpose
    edges = {0, len(arrays), *others, *(i + 1 for i in others)}
    per_join = max(1, _JOIN_BYTES // row_bytes)
    if n_rows > per_join:  # cut the runs near every per_join rows
        edges.update(np.searchsorted(first_row, np.arange(per_join, n_rows, per_join)).tolist())
    edges = sorted(edges)
    others = set(others)
    flat = memoryview(dst)
    for a, b in zip(edges, edges[1:]):
        if a in others:
            stack_token_major(component, [arrays[a]], out=out[first_row[a] : first_row[b]])
            continue
        start, end = first_row[a] * row_bytes, first_row[b] * row_bytes
        if end == start:
            continue
        try:  # bytes.join and cast take only C-contiguous buffers: a strided step raises
            flat[start:end] = memoryview(arrays[a]).cast("B") if b == a + 1 else b"".join(map(memoryview, arrays[a:b]))
        except (BufferError, TypeError):
            for i in range(a, b):
                stack_token_major(component, [arrays[i]], out=out[first_row[i] : first_row[i + 1]])


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
