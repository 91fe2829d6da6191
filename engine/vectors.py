"""Stored vectors: named directions that interventions (add, set, project_out) refer to by id.

A vector is made once, checked against the loaded model's sizes, and kept as read-only
float32 so an intervention can use it on every decode step without re-validating it. It is
made from numbers (a list, or base64 float32/float16/bfloat16), from a capture (the mean or
last row of one hook over chosen positions) or from a llama.cpp control vector (GGUF).

Shapes: [n] with n one of d_model (residual stream, attention/MLP outputs), d_head (one
attention head) or d_mlp (MLP neurons); or [heads, d_head] with heads n_heads or n_kv_heads
(per-head queries, keys, values).

The store belongs to one loaded model (engine.Model owns it), so vectors go away when
another model loads. No HTTP here: errors are engine.errors.InvalidArgument with `arg`
naming the field at fault, and UnknownVector for an id the store does not hold.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engine.errors import InvalidArgument, UnknownVector

MAX_NAME = 200
POSITION_SETS = ("all", "prompt", "generated")
REDUCTIONS = ("mean", "last")
BASE64_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_SIZE_HELP = {"d_model": "residual stream", "d_mlp": "MLP neurons", "d_head": "one attention head",
              "n_experts": "router logits"}


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to a bool; identity is what matters
class Vector:
    vector_id: str
    name: str | None
    data: np.ndarray  # float32, read-only, [n] or [heads, n]
    layer: int | None  # the decoder layer it was made for, if any
    source: dict = field(default_factory=dict)  # how it was made (see VectorStore)
    created: float = 0.0

    def describe(self) -> dict:
        """JSON-able summary without the numbers (what listing shows)."""
        return {
            "vector_id": self.vector_id, "name": self.name, "shape": list(self.data.shape), "dtype": "float32",
            "layer": self.layer, "source": dict(self.source), "created": self.created,
            "norm": float(np.linalg.norm(self.data.astype(np.float64))),
        }


class VectorStore:
    """Vectors for one loaded model; engine.Model owns one, so they are dropped when another model loads.

    `dims` holds the model's d_model, d_head, n_heads, n_kv_heads, d_mlp, n_experts and n_layers (a size
    left out is simply not accepted). Safe to use from several threads."""

    def __init__(self, dims: Mapping[str, int], max_vectors: int = 1024):
        self.dims = {k: int(v) for k, v in dims.items() if v is not None}
        self.max_vectors = max_vectors
        self._vectors: dict[str, Vector] = {}
        self._lock = threading.Lock()

    # ---- making vectors ----

    def add(self, data: Any, *, name: str | None = None, layer: int | None = None,
            source: dict | None = None) -> Vector:
        """Store numbers (a list, nested lists, or an array) as a vector."""
        return self._store([self._make(data, name, layer, source or {"kind": "inline"}, "vector")])[0]

    def add_base64(self, b64: str, dtype: str, shape: list[int] | None = None, **kw) -> Vector:
        """Store raw little-endian numbers sent as base64 (bfloat16 as its uint16 bits): the
        compact, exact way to send a vector. `shape` defaults to one dimension."""
        if dtype not in BASE64_DTYPES:
            raise InvalidArgument(f"dtype {dtype!r} is not supported; use one of {', '.join(BASE64_DTYPES)}",
                                  "dtype")
        if not isinstance(b64, (str, bytes)):
            raise InvalidArgument(f"vector must be a base64 string, got {type(b64).__name__}", "vector")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(f"vector is not valid base64 ({exc}); send standard base64 without line breaks",
                                  "vector") from None
        item = BASE64_DTYPES[dtype].itemsize
        if len(raw) % item:
            raise InvalidArgument(f"vector has {len(raw)} bytes, not a multiple of {item} ({dtype} is {item} bytes "
                                  "a number); send whole little-endian numbers", "vector")
        values = np.frombuffer(raw, BASE64_DTYPES[dtype])
        if dtype == "bfloat16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        if shape is not None:
            if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 2
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise InvalidArgument(f"shape must be a list of one or two positive integers, got {shape!r}", "shape")
            if int(np.prod(shape)) != values.size:
                raise InvalidArgument(f"shape {list(shape)} needs {int(np.prod(shape))} numbers but the data holds "
                                      f"{values.size} {dtype} values", "shape")
            values = values.reshape(shape)
        kw.setdefault("source", {"kind": "base64", "dtype": dtype})
        return self.add(values, **kw)

    def from_capture(self, hook_array: Any, *, reduce: str, positions: Any, capture_id: str, hook_id: str,
                     name: str | None = None, prompt_tokens: int | None = None) -> Vector:
        """A vector from one captured hook (a shm.reader.HookArray or alike): the mean of the rows
        at `positions` ("all", "prompt", "generated" or a list of positions), or the row with the
        highest of them (`reduce="last"`). `prompt_tokens` is needed for "prompt"/"generated".
        The vector keeps the hook's layer."""
        arg = "from_capture"
        if reduce not in REDUCTIONS:
            raise InvalidArgument(f"reduce {reduce!r} is not supported; use 'mean' (average of the selected "
                                  "positions) or 'last' (the highest selected position)", arg + ".reduce")
        info = getattr(hook_array, "info", None)
        component = getattr(info, "component", None) or getattr(hook_array, "component", None)
        if getattr(info, "key_pad", None) is not None or component in ("attention_scores", "attention_pattern"):
            raise InvalidArgument(f"hook {hook_id!r} holds {component} (one value per key, a length that grows "
                                  "with the sequence): no fixed-size vector can be made from it; use residual, "
                                  "attention, mlp, embedding, layernorm, query, key or value", arg + ".hook_id")
        pos = np.asarray(hook_array.position).astype(np.int64)
        mask = self._select(pos, positions, prompt_tokens, capture_id, hook_id)
        rows = np.flatnonzero(mask)
        if reduce == "last":
            rows = rows[np.argmax(pos[rows])][None]
        data = np.asarray(hook_array.data)[rows]
        if getattr(info, "dtype", None) == "bfloat16" and data.dtype == np.uint16:  # bfloat16 travels as its bits
            data = (data.astype(np.uint32) << 16).view(np.float32)  # exact, like HookArray.to_float32
        vec = data.astype(np.float64).mean(axis=0) if reduce == "mean" else data[0]
        layer = getattr(info, "layer_index", None)
        source = {"kind": "capture", "capture_id": capture_id, "hook_id": hook_id, "component": component,
                  "reduce": reduce, "count": int(rows.size),
                  "positions": positions if isinstance(positions, str) else [int(p) for p in positions]}
        return self._store([self._make(vec, name, layer, source, arg)])[0]

    def import_controlvector(self, path_or_bytes: str | os.PathLike | bytes, *,
                             name: str | None = None) -> list[Vector]:
        """Store a llama.cpp control vector (GGUF, architecture "controlvector"): one vector per
        `direction.N` tensor, with layer N. llama.cpp adds direction.N to the output of decoder
        layer N (0-based), our `blocks.N.hook_resid_post`, so interventions put it there. All
        directions are stored, or none."""
        arg = "controlvector"
        _check_name(name)
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            raw, file, stem = bytes(path_or_bytes), None, "controlvector"
        else:
            path = Path(path_or_bytes)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read control vector file {path}: {exc.strerror or exc}", arg) from None
            file, stem = path.name, path.stem
        meta, tensors = read_gguf(raw, arg)
        arch = meta.get("general.architecture")
        if arch != "controlvector":
            what = "no general.architecture" if arch is None else f"architecture {arch!r}"
            raise InvalidArgument(f"this GGUF file has {what}, not 'controlvector': it is not a llama.cpp control "
                                  "vector (a model file cannot be imported as vectors)", arg)
        if not tensors:
            raise InvalidArgument("this control vector holds no direction.N tensors", arg)
        d_model, n_layers = self.dims.get("d_model"), self.dims.get("n_layers")
        hint = meta.get("controlvector.model_hint")
        made_for = f" (it was made for {hint!r})" if isinstance(hint, str) else ""
        by_layer: dict[int, np.ndarray] = {}
        for tname, (ggml_type, shape, blob) in tensors.items():
            m = re.fullmatch(r"direction\.(\d+)", tname)
            if not m:
                raise InvalidArgument(f"control vector tensor {tname!r} is not named direction.N", arg)
            n = int(m.group(1))
            if n == 0:
                raise InvalidArgument("control vector has direction.0, which llama.cpp refuses: its directions start "
                                      "at 1 (direction.N is added after decoder layer N, and layer 0 is never "
                                      "steered); remove that tensor", arg)
            if n_layers is not None and n >= n_layers:
                raise InvalidArgument(f"control vector has direction.{n} but this model has {n_layers} layers "
                                      f"(0 to {n_layers - 1}){made_for}", arg)
            if ggml_type != 0 or len(shape) != 1:
                kind = _GGML_NAMES.get(ggml_type, f"ggml type {ggml_type}")
                raise InvalidArgument(f"control vector tensor {tname} must be float32 of one dimension [n_embd], as "
                                      f"llama.cpp requires (it is {kind}, shape {shape})", arg)
            if d_model is not None and shape[0] != d_model:
                raise InvalidArgument(f"control vector has n_embd {shape[0]} but this model's d_model is {d_model}"
                                      f"{made_for}; use a control vector made for this model", arg)
            by_layer[n] = np.frombuffer(blob, "<f4")
        label = name or stem
        made = []
        for n in sorted(by_layer):
            source = {"kind": "controlvector", "file": file, "direction": n}
            if isinstance(hint, str):
                source["model_hint"] = hint
            made.append(self._make(by_layer[n], f"{label}.direction.{n}", n, source, arg))
        return self._store(made)

    @staticmethod
    def _select(pos: np.ndarray, positions: Any, prompt_tokens: Any, capture_id: str, hook_id: str) -> np.ndarray:
        """Rows of a capture at `positions`; every listed position must be there."""
        arg = "from_capture.positions"
        held = _ranges(sorted(set(pos.tolist())))
        where = f"hook {hook_id!r} of capture {capture_id!r} holds positions {held}"
        if isinstance(positions, str):
            if positions not in POSITION_SETS:
                hint = " (for the last token use reduce 'last')" if positions == "last" else ""
                raise InvalidArgument(f"positions {positions!r} is not supported{hint}; use 'all', 'prompt', "
                                      "'generated' or a list of token positions", arg)
            if positions != "all" and (not isinstance(prompt_tokens, int) or prompt_tokens < 0):
                raise InvalidArgument(f"positions {positions!r} needs the capture's prompt length: pass "
                                      "prompt_tokens (the capture's prompt_tokens)",
                                      "from_capture.prompt_tokens")
            mask = {"all": np.ones(pos.shape, bool), "prompt": pos < (prompt_tokens or 0),
                    "generated": pos >= (prompt_tokens or 0)}[positions]
            if not mask.any():
                which = "" if positions == "all" else positions + " "
                raise InvalidArgument(f"there are no {which}positions to use: {where}", arg)
            return mask
        if (not isinstance(positions, (list, tuple)) or not positions
                or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in positions)):
            raise InvalidArgument(f"positions must be 'all', 'prompt', 'generated' or a non-empty list of integer "
                                  f"token positions, got {str(positions)[:80]}", arg)
        missing = sorted(set(int(p) for p in positions) - set(pos.tolist()))
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise InvalidArgument(f"position(s) {shown} are not in the capture: {where}", arg)
        return np.isin(pos, np.asarray(positions, np.int64))

    # ---- reading and removing ----

    def get(self, vector_id: str) -> Vector:
        with self._lock:
            vec = self._vectors.get(vector_id) if isinstance(vector_id, str) else None
        if vec is None:
            shown = repr(vector_id) if len(repr(vector_id)) <= 60 else repr(vector_id)[:57] + "..."
            raise UnknownVector(f"no vector {shown} (it may have been deleted, or dropped when another model "
                                "loaded); list the stored vectors to see their ids", "vector_id")
        return vec

    def delete(self, vector_id: str) -> None:
        vec = self.get(vector_id)
        with self._lock:
            self._vectors.pop(vec.vector_id, None)

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, vector_id: object) -> bool:
        return isinstance(vector_id, str) and vector_id in self._vectors

    def list(self) -> list[Vector]:
        """Every stored vector, oldest first."""
        with self._lock:
            return [*self._vectors.values()]

    # ---- checks ----

    def _store(self, vectors: list[Vector]) -> list[Vector]:
        with self._lock:
            room = self.max_vectors - len(self._vectors)
            if len(vectors) > room:
                need = f"{len(vectors)} vectors" if len(vectors) > 1 else "a vector"
                raise InvalidArgument(f"the vector store is full ({len(self._vectors)} of {self.max_vectors}; "
                                      f"{need} would not fit); delete vectors you no longer need", "vector")
            for vec in vectors:
                self._vectors[vec.vector_id] = vec
        return vectors

    def _make(self, data: Any, name: Any, layer: Any, source: dict, arg: str) -> Vector:
        _check_name(name)
        n_layers = self.dims.get("n_layers")
        if layer is not None:
            if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
                raise InvalidArgument(f"layer must be an integer or null, got {layer!r}", "layer")
            if n_layers is not None and not 0 <= layer < n_layers:
                raise InvalidArgument(f"layer {layer} does not exist: the model has {n_layers} layers, numbered 0 "
                                      f"to {n_layers - 1}", "layer")
            layer = int(layer)
        arr = self._check(to_float32(data, arg), arg)
        arr.flags.writeable = False
        return Vector("vec_" + secrets.token_hex(8), name, arr, layer, dict(source), time.time())

    def _check(self, arr: np.ndarray, arg: str) -> np.ndarray:
        """The shape must fit a site of this model."""
        sizes = {k: self.dims[k] for k in ("d_model", "d_mlp", "d_head") if k in self.dims}
        if self.dims.get("n_experts"):  # mixture-of-experts models only
            sizes["n_experts"] = self.dims["n_experts"]
        allowed = " or ".join(f"{k} {v} ({_SIZE_HELP[k]})" for k, v in sizes.items())
        heads = {k: self.dims[k] for k in ("n_heads", "n_kv_heads") if k in self.dims}
        if arr.ndim == 1 and arr.shape[0] not in sizes.values():
            raise InvalidArgument(f"{arg} has length {arr.shape[0]}; this model takes vectors of length {allowed}",
                                  arg)
        if arr.ndim == 2 and (arr.shape[0] not in heads.values() or arr.shape[1] != sizes.get("d_head")):
            head_sizes = " or ".join(sorted({str(v) for v in heads.values()}))
            raise InvalidArgument(f"{arg} has shape {list(arr.shape)}; a per-head vector is [heads, d_head] with "
                                  f"heads {head_sizes} (n_heads, n_kv_heads) and d_head {sizes.get('d_head')}; "
                                  f"other vectors are one-dimensional: length {allowed}", arg)
        return arr


def _check_name(name: Any) -> None:
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME):
        raise InvalidArgument(f"name must be a non-empty string of at most {MAX_NAME} characters", "name")


def to_float32(data: Any, arg: str = "vector") -> np.ndarray:
    """Numbers -> a new float32 array of one or two dimensions, all finite; an InvalidArgument
    naming `arg` that says what is wrong otherwise."""
    if data is None or isinstance(data, (str, bytes, dict, bool)):
        raise InvalidArgument(f"{arg} must be a list of numbers (or of equal-length lists), got "
                              f"{type(data).__name__}", arg)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{arg} is ragged: its rows have different lengths; give a list of numbers or a "
                              "list of equal-length lists", arg) from None
    if arr.dtype.kind == "O":  # nulls, huge integers, mixed types
        if not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in arr.flat):
            raise InvalidArgument(f"{arg} must hold only numbers (no strings, nulls or objects)", arg)
        arr = arr.astype(np.float64)
    if arr.dtype.kind not in "iuf":
        raise InvalidArgument(f"{arg} must hold only numbers, got {arr.dtype.name} values", arg)
    if arr.ndim == 0:
        raise InvalidArgument(f"{arg} must be a list of numbers, not a single number", arg)
    if arr.ndim > 2:
        raise InvalidArgument(f"{arg} has {arr.ndim} dimensions {list(arr.shape)}; give [n] or [heads, d_head]", arg)
    if arr.size == 0:
        raise InvalidArgument(f"{arg} is empty (shape {list(arr.shape)})", arg)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        where = [str(list(map(int, i))) if arr.ndim > 1 else str(int(i[0])) for i in np.argwhere(bad)[:5]]
        more = ", ..." if bad.sum() > 5 else ""
        at = f"index {where[0]}" if len(where) == 1 else "indices " + ", ".join(where) + more
        raise InvalidArgument(f"{arg} has {int(bad.sum())} non-finite value(s) (NaN, infinity, or beyond float32's "
                              f"range of ±3.4e38) at {at}; send finite numbers only", arg)
    return out


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (for messages; at most 8 runs shown)."""
    if not values:
        return "none"
    runs, lo = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(str(lo) if lo == prev else f"{lo}-{prev}")
            lo = cur
    return ", ".join(runs[:8]) + (", ..." if len(runs) > 8 else "")


# ---- GGUF (llama.cpp's file format), read without mlx ----
# mx.load reads GGUF but crashes the process on some malformed files (see engine/gguf.py's
# _probe), and control vectors arrive from clients: this reader checks every length first.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGML_SIZES = {0: 4, 1: 2, 30: 2}  # F32, F16, BF16: the types a vector could be; others are refused by name
_GGML_NAMES = {0: "float32", 1: "float16", 30: "bfloat16"}


class _Reader:
    def __init__(self, raw: bytes, arg: str):
        self.raw, self.pos, self.arg = raw, 0, arg

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"not a valid GGUF file: {why}", self.arg)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise self.fail(f"it ends early (at byte {len(self.raw)}, needing {n} more from byte {self.pos}); "
                            "the file may be truncated")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9 and depth < 3:
            elem, count = self.scalar("<I"), self.scalar("<Q")
            if elem in _SCALARS:  # skipped, not decoded: no control vector key is an array
                self.take(count * struct.calcsize(_SCALARS[elem]))
                return None
            for _ in range(count):
                self.value(elem, depth + 1)
            return None
        raise self.fail(f"unknown metadata value type {kind} at byte {self.pos - 4}")


def read_gguf(raw: bytes, arg: str = "controlvector") -> tuple[dict, dict[str, tuple[int, list[int], bytes]]]:
    """Metadata (scalars and strings; arrays skipped as None) and tensors {name: (ggml type,
    shape, bytes)} of a little-endian GGUF v2/v3 file. Shapes are numpy order (GGUF lists the
    fastest-varying dimension first). Bytes are returned only for F32, F16 and BF16 tensors."""
    r = _Reader(raw, arg)
    if raw[:4] != b"GGUF":
        raise InvalidArgument("not a GGUF file (it does not start with 'GGUF'); give a llama.cpp control vector "
                              ".gguf file", arg)
    r.take(4)
    version = r.scalar("<I")
    if version not in (2, 3):
        endian = " (a big-endian file, which is not supported)" if version >= 1 << 16 else ""
        raise r.fail(f"GGUF version {version}{endian}; versions 2 and 3 are supported")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("<I")
        if n_dims > 4:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most 4)")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims[::-1], r.scalar("<I"), r.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise r.fail(f"general.alignment {align!r} is not a power of two")
    start = -(-r.pos // align) * align
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise r.fail(f"tensor {name!r} appears twice")
        blob = b""
        if ggml_type in _GGML_SIZES:
            size = _GGML_SIZES[ggml_type] * int(np.prod(shape, dtype=object))
            if start + offset + size > len(raw):
                raise r.fail(f"tensor {name!r} extends past the end of the file; the file may be truncated")
            blob = raw[start + offset:start + offset + size]
        tensors[name] = (ggml_type, shape, blob)
    return meta, tensors
