"""The Arrow layout of one capture (`nsbridge.activations/1`); docs/shm-format.md is the spec.

One capture is one Arrow IPC stream holding one record batch. A row is one processed token
(prompt tokens of the prefill, then one per decode step); columns `step`, `position` and
`token_id` say which, and every hook is one `arrow.fixed_shape_tensor` column whose cell is
that token's tensor. So a hook over all steps is a single contiguous [rows, *shape] array
(`stack_token_major` builds it from a hook's per-step arrays).

What each component is comes from vocabulary.py. This module is shared by the writer, the
reader, the bridge and the engine, and imports neither MLX nor the engine.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from vocabulary import COMPONENTS

FORMAT_VERSION = "nsbridge.activations/1"

STEP, POSITION, TOKEN_ID = "step", "position", "token_id"
RESERVED_COLUMNS = (STEP, POSITION, TOKEN_ID)

# What each component is (per-token dim names, token axis, key pad) lives in vocabulary.py.
# Q/K/V are stored token-major ([T, H, d_head], TransformerLens' hook_q layout); scores and
# patterns as [T_q, H, T_k], their key axis padded to the capture's last position + 1.
KEY_PAD = {name: c.key_pad for name, c in COMPONENTS.items() if c.key_pad is not None}

# Storage type per logical dtype. Arrow has no bfloat16: its bits travel as uint16.
STORAGE = {
    "float32": (np.dtype(np.float32), pa.float32()),
    "float16": (np.dtype(np.float16), pa.float16()),
    "bfloat16": (np.dtype(np.uint16), pa.uint16()),
}
LOGICAL_DTYPE = {np_type: name for name, (np_type, _) in STORAGE.items()}  # uint16 is always bfloat16 bits

_P = "nsbridge."  # prefix of every metadata key this format defines


def pad_bits(component: str, dtype: str) -> Any:
    """The key-axis pad as a scalar of the storage dtype (bfloat16: its uint16 bits)."""
    value = KEY_PAD[component]
    if dtype == "bfloat16":
        f32 = np.array([value], dtype=np.float32).view(np.uint32)[0]
        return np.uint16(f32 >> 16)  # exact for -inf and 0.0
    return STORAGE[dtype][0].type(value)


def to_numpy(array: Any) -> np.ndarray:
    """A zero-copy numpy view of an evaluated MLX array (or the numpy array itself); bfloat16
    comes back as its uint16 bits. MLX arrays export their buffer, so this module never
    imports mlx; only a strided bfloat16 view asks MLX (already loaded, as it made the array)."""
    if isinstance(array, np.ndarray):
        return array
    view = memoryview(array)
    if view.format != "bfloat16":
        return np.asarray(array)
    if not view.nbytes:
        return np.empty(view.shape, np.uint16)
    if view.c_contiguous:  # numpy knows no bfloat16: read the same bytes as uint16
        return np.frombuffer(view.cast("B"), np.uint16).reshape(view.shape)
    import mlx.core as mx  # a transposed or sliced view: MLX reinterprets it in place

    return np.asarray(array.view(mx.uint16))


def _readable(arrays: Sequence[Any]) -> Sequence[Any]:
    """`arrays` as numpy can take them. numpy reads an MLX array's buffer itself, inside its
    own C loop: about a third of the cost of a Python-level view per array, which is what a
    long generation costs (one small array per hook per decode step). bfloat16 has no buffer
    format numpy knows: those arrays become their uint16 bits one by one (`to_numpy`)."""
    first = arrays[0]
    if isinstance(first, np.ndarray) or memoryview(first).format != "bfloat16":
        return arrays
    return [to_numpy(a) for a in arrays]


def stack_token_major(component: str, arrays: Sequence[Any], key_pad_to: int | None = None, *,
                      out: np.ndarray | None = None) -> np.ndarray:
    """One hook's per-step arrays (engine layout: tokens on the component's `token_axis`) as
    one token-major [rows, *per_token] array, the layout of the capture's column: [H, T, x]
    steps become [T, H, x] rows, and a key-padded component's key axis is padded with its
    `key_pad` up to `key_pad_to` (default: the longest step's). Arrays may be numpy or MLX;
    uint16 arrays are bfloat16 bits (padded with the pad's bits). Writes into `out` when
    given (its last axis is then the padded key length); otherwise the result may be a view
    of the only input when that needs no copy."""
    comp = COMPONENTS[component]
    if not len(arrays):
        raise ValueError(f"no arrays to stack for component {component!r}")
    axis = comp.token_axis
    if comp.key_pad is None:
        srcs = _readable(arrays)
        if out is None:
            if len(srcs) == 1 and not axis:
                return np.ascontiguousarray(np.asarray(srcs[0]))
            first = np.asarray(srcs[0])
            rows = sum(int(a.shape[axis]) for a in srcs)
            out = np.empty((rows, *first.shape[:axis], *first.shape[axis + 1 :]), first.dtype)
        # One C loop over all steps, transposing as it copies: the token axis of `out` moved
        # to where the steps have it.
        np.concatenate(srcs, axis=axis, out=np.moveaxis(out, 0, axis) if axis else out)
        return out
    srcs = [to_numpy(a) for a in arrays]
    if axis:
        srcs = [np.moveaxis(a, axis, 0) for a in srcs]  # strided views; the copy transposes
    if out is None:
        n_keys = max(a.shape[-1] for a in srcs)
        if key_pad_to is not None:
            if key_pad_to < n_keys:
                raise ValueError(f"key_pad_to={key_pad_to} is shorter than a step's {n_keys} keys")
            n_keys = key_pad_to
        out = np.empty((sum(a.shape[0] for a in srcs), *srcs[0].shape[1:-1], n_keys), srcs[0].dtype)
    logical = LOGICAL_DTYPE.get(out.dtype)
    pad = pad_bits(component, logical) if logical else out.dtype.type(comp.key_pad)
    row = 0
    for src in srcs:  # the key axis differs per step: copy, then pad the rest
        n, k = src.shape[0], src.shape[-1]
        np.copyto(out[row : row + n, ..., :k], src)
        if k < out.shape[-1]:
            out[row : row + n, ..., k:] = pad
        row += n
    return out


def column_names(hooks: list[tuple[str, bool]]) -> list[str]:
    """Unique column names for (hook_id, is_input) pairs, in order. A hook captured both as
    input and output shares one hook_id, so a repeated id becomes `<id>:input` or
    `<id>:output`, then `#2`, `#3`...; the field metadata keeps the real hook_id."""
    seen = set(RESERVED_COLUMNS)
    out = []
    for hook_id, is_input in hooks:
        name = hook_id
        if name in seen:
            base = f"{hook_id}:input" if is_input else f"{hook_id}:output"
            name, n = base, 2
            while name in seen:
                name, n = f"{base}#{n}", n + 1
        seen.add(name)
        out.append(name)
    return out


def hook_field(
    *,
    hook_id: str,
    layer_name: str,
    module_path: str,
    layer_index: int | None,
    component: str,
    is_input: bool,
    dtype: str,
    shape: tuple[int, ...] | list[int],
    name: str | None = None,
) -> pa.Field:
    """The column of one hook: a fixed-shape tensor per token plus descriptive metadata.
    `name` is the column name (default: the hook_id; see `column_names`)."""
    return _hook_field(
        name or hook_id, hook_id, layer_name, module_path, layer_index, component, bool(is_input), dtype,
        tuple(int(d) for d in shape),
    )


@functools.lru_cache(maxsize=4096)  # the same hooks come back request after request
def _hook_field(
    name: str,
    hook_id: str,
    layer_name: str,
    module_path: str,
    layer_index: int | None,
    component: str,
    is_input: bool,
    dtype: str,
    shape: tuple[int, ...],
) -> pa.Field:
    if name in RESERVED_COLUMNS:
        raise ValueError(f"column name {name!r} is reserved")
    if dtype not in STORAGE:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(STORAGE)}")
    names = list(COMPONENTS[component].dim_names) if component in COMPONENTS else None
    if names is None or len(names) != len(shape):
        names = [f"dim{i}" for i in range(len(shape))]
    tensor_type = pa.fixed_shape_tensor(STORAGE[dtype][1], list(shape), dim_names=names)
    meta = {
        _P + "hook_id": hook_id,
        _P + "layer_name": layer_name,
        _P + "module_path": module_path,
        _P + "layer_index": json.dumps(layer_index),
        _P + "component": component,
        _P + "is_input": json.dumps(bool(is_input)),
        _P + "dtype": dtype,
        _P + "shape": json.dumps(list(shape)),
        _P + "dim_names": json.dumps(["token", *names]),
    }
    if component in KEY_PAD:
        # "-Infinity" / "0.0": parse with float() (Python) or Number() (JavaScript).
        meta[_P + "key_pad"] = "-Infinity" if KEY_PAD[component] < 0 else "0.0"
    return pa.field(name, tensor_type, nullable=False, metadata=meta)


ROW_FIELDS = [pa.field(name, pa.int32(), nullable=False) for name in RESERVED_COLUMNS]


def capture_metadata(
    *, capture_id: str, model_id: str, token_ids: list[int], tokens: list[str], prompt_tokens: int
) -> dict[str, str]:
    """The schema metadata that describes one capture."""
    return {
        _P + "format": FORMAT_VERSION,
        _P + "capture_id": capture_id,
        _P + "model_id": model_id,
        _P + "prompt_tokens": str(int(prompt_tokens)),
        _P + "token_ids": json.dumps([int(t) for t in token_ids]),
        _P + "tokens": json.dumps(list(tokens), ensure_ascii=False),
    }


def capture_schema(fields: list[pa.Field], **meta: Any) -> pa.Schema:
    """The stream's schema: reserved row columns, then one column per hook."""
    return pa.schema(ROW_FIELDS + fields, metadata=capture_metadata(**meta))


@dataclass(frozen=True)
class CaptureInfo:
    format: str
    capture_id: str
    model_id: str
    prompt_tokens: int
    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class HookInfo:
    hook_id: str
    layer_name: str
    module_path: str
    layer_index: int | None
    component: str
    is_input: bool
    dtype: str  # logical dtype; "bfloat16" data is stored as uint16 bits
    shape: tuple[int, ...]  # per token
    dim_names: tuple[str, ...]  # including the leading "token" axis
    key_pad: float | None  # pad of the key axis (scores/patterns), else None


def _meta(md: dict[bytes, bytes] | None) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (md or {}).items() if k.startswith(_P.encode())}


def parse_schema(schema: pa.Schema) -> CaptureInfo:
    m = _meta(schema.metadata)
    fmt = m.get(_P + "format", "")
    if fmt.split("/")[0] != FORMAT_VERSION.split("/")[0]:
        raise ValueError(f"not an nsbridge activations stream (format={fmt!r})")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"unsupported format version {fmt!r}; this reader knows {FORMAT_VERSION}")
    return CaptureInfo(
        format=fmt,
        capture_id=m[_P + "capture_id"],
        model_id=m[_P + "model_id"],
        prompt_tokens=int(m[_P + "prompt_tokens"]),
        token_ids=json.loads(m[_P + "token_ids"]),
        tokens=json.loads(m[_P + "tokens"]),
    )


def parse_field(field: pa.Field) -> HookInfo:
    m = _meta(field.metadata)
    pad = m.get(_P + "key_pad")
    return HookInfo(
        hook_id=m[_P + "hook_id"],
        layer_name=m[_P + "layer_name"],
        module_path=m[_P + "module_path"],
        layer_index=json.loads(m[_P + "layer_index"]),
        component=m[_P + "component"],
        is_input=json.loads(m[_P + "is_input"]),
        dtype=m[_P + "dtype"],
        shape=tuple(json.loads(m[_P + "shape"])),
        dim_names=tuple(json.loads(m[_P + "dim_names"])),
        key_pad=None if pad is None else float(pad),
    )


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 stored as uint16 bits (a copy; exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
