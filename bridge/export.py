"""Captures to files and back, for analysis later and elsewhere.

- `save_capture(capture, "run.arrow")`: an Arrow IPC *file* in the server's own capture
  layout (`nsbridge.activations/1`, docs/shm-format.md): one row per processed token, one
  fixed-shape tensor column per hook, tokens and ids in the schema metadata, laid out by
  the server's own writer (`shm.writer`). Any capture the bridge knows can be saved: an inline response (JSON or base64 entries), a streamed
  result, a `ShmCapture`, an `shm.CaptureView`.
  `load_capture("run.arrow")` memory-maps it and returns an `shm.CaptureView` (zero-copy;
  `bridge.neuroscope.to_neuroscope` converts it like a live capture).
- `save_capture(capture, "run.safetensors")` (or `format="safetensors"`): NeuroScope's
  format (docs/neuroscope-format.md), one float32 tensor per `layer/component`, everything
  else in the header metadata. `load_neuroscope("run.safetensors")` gives the dict back.
  Needs the `safetensors` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from bridge.neuroscope import FORMAT, HookRows, capture_rows, iter_tensors, to_neuroscope
from shm.format import STORAGE
from shm.reader import CaptureView, read_table
from shm.writer import capture_to_bytes
from vocabulary import COMPONENTS

ARROW_SUFFIXES = (".arrow", ".arrows", ".feather", ".ipc")
SAFETENSORS_SUFFIXES = (".safetensors", ".st")


def _format_for(path: Path, format: str | None) -> str:
    if format:
        if format not in ("arrow", "safetensors"):
            raise ValueError("format must be 'arrow' or 'safetensors'")
        return format
    if path.suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    return "arrow"


def save_capture(capture: Any, path: str | Path, format: str | None = None, compression: str | None = None) -> str:
    """Write `capture` to `path` (Arrow IPC file, or safetensors by suffix/`format`)."""
    path = Path(path)
    fmt = _format_for(path, format)
    if fmt == "safetensors":
        save_neuroscope_safetensors(capture if _is_neuroscope(capture) else to_neuroscope(capture), path)
        return str(path)
    table = capture_table(capture)
    options = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return str(path)


def load_capture(path: str | Path) -> CaptureView:
    """An Arrow capture file -> `shm.CaptureView`, memory-mapped (values are not copied)."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    if table.num_rows and any(table.column(i).num_chunks != 1 for i in range(table.num_columns)):
        table = table.combine_chunks()
    return CaptureView(table)


# --- Arrow ------------------------------------------------------------------------------
def capture_table(capture: Any) -> pa.Table:
    """The capture as one table in the `nsbridge.activations/1` layout: a CaptureView's own
    table, or any other capture laid out by the server's writer (`shm.writer`)."""
    from bridge.client import ShmCapture

    view = capture.view if isinstance(capture, ShmCapture) else capture
    if isinstance(view, CaptureView):
        if view.table is None:
            raise ValueError("the capture is closed; save it before closing")
        return view.table
    meta, rows = capture_rows(capture)
    return read_table(capture_to_bytes(_as_capture(meta, rows)))


def _storage(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return values.astype(np.float16)  # exact: the values came from float16
    if dtype == "bfloat16":
        return (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(values, np.float32)


def _as_capture(meta: dict, rows: list[HookRows]) -> SimpleNamespace:
    """HookRows back in the shape shm.writer reads (see its docstring): per-step arrays in
    the engine's layout, in the captured dtype. Key-padded rows stay padded (the pad is exact)."""
    hooks = []
    for r in rows:
        dtype = r.source_dtype if r.source_dtype in STORAGE else "float32"
        values = _storage(r.data, dtype)
        axis = COMPONENTS[r.component].token_axis
        bounds = [0, *(np.flatnonzero(np.diff(r.step)) + 1), len(r.step)]  # rows are in step order
        steps = []
        for lo, hi in zip(bounds[:-1], bounds[1:]) if len(r.step) else ():
            start = int(r.position[lo])
            if not np.array_equal(r.position[lo:hi], np.arange(start, start + hi - lo)):
                raise ValueError(f"hook {r.hook_id!r} step {int(r.step[lo])}: positions are not consecutive")
            steps.append(SimpleNamespace(step=int(r.step[lo]), start=start,
                                         array=np.moveaxis(values[lo:hi], 0, axis)))
        hooks.append(SimpleNamespace(hook_id=r.hook_id, layer_name=r.layer_name, module_path=r.module_path,
                                     layer_index=r.layer, component=r.component, is_input=r.is_input,
                                     dtype=dtype, steps=steps))
    return SimpleNamespace(
        capture_id=meta.get("capture_id") or "inline", model_id=meta.get("model_id") or "",
        token_ids=[int(t) for t in meta.get("token_ids") or []], tokens=list(meta.get("tokens") or []),
        prompt_tokens=int(meta.get("prompt_tokens") or 0), hooks=hooks,
    )


# --- safetensors (NeuroScope's format) ---------------------------------------------------
def _is_neuroscope(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "layers" in obj


def save_neuroscope_safetensors(ns: dict, path: str | Path) -> str:
    """NeuroScope's format as safetensors: tensors named `<layer>/<component>`; the header
    metadata holds `neuroscope` (JSON of everything but the data)."""
    from safetensors.numpy import save_file

    tensors = {}
    described: dict = {k: v for k, v in ns.items() if k != "layers"}
    described["layers"] = {}
    for layer, comp, t in iter_tensors(ns):
        name = f"{layer}/{comp}"
        tensors[name] = np.ascontiguousarray(t["data"], dtype=np.float32)
        described["layers"].setdefault(layer, {})[comp] = {**{k: v for k, v in t.items() if k != "data"},
                                                           "tensor": name}
    save_file(tensors, str(path), metadata={"format": FORMAT, "neuroscope": json.dumps(described)})
    return str(path)


def load_neuroscope(path: str | Path) -> dict:
    """A safetensors file written by `save_capture(..., format="safetensors")` -> NeuroScope's format."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a NeuroScope capture (format={meta.get('format')!r})")
        ns = json.loads(meta["neuroscope"])
        for layer, comps in ns["layers"].items():
            for comp, t in comps.items():
                t["data"] = f.get_tensor(t.pop("tensor"))
    return ns


def load_any(path: str | Path) -> dict:
    """NeuroScope's format from either kind of file."""
    path = Path(path)
    if _format_for(path, None) == "safetensors":
        return load_neuroscope(path)
    view = load_capture(path)
    try:
        return to_neuroscope(view)
    finally:
        view.close()


__all__ = ["capture_table", "load_any", "load_capture", "load_neuroscope", "save_capture",
           "save_neuroscope_safetensors"]
