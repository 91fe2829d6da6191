"""Activations as inline JSON entries (the original contract, what NeuroScope reads).

`data` is nested lists of numbers matching `shape`, written by orjson straight from the numpy
buffer: no Python float objects are made per value. `activations_encoding: "base64"` opts in to
raw little-endian bytes instead (one Float32Array view on the JavaScript side).
"""

from __future__ import annotations

import base64

import numpy as np

from shm.format import bfloat16_to_float32, to_numpy
from vocabulary import COMPONENTS


def step_entry(rec, st, encoding: str = "json") -> dict:
    """One hook's entry for one step (`rec`: a HookRecord, `st`: one of its StepTensors)."""
    raw = np.ascontiguousarray(to_numpy(st.array))  # bfloat16 as its uint16 bits
    n = st.array.shape[COMPONENTS[rec.component].token_axis]
    entry = {
        "hook_id": rec.hook_id,
        "layer_name": rec.layer_name,
        "layer_index": rec.layer_index,
        "component": rec.component,
        "shape": list(raw.shape),
        "dtype": rec.dtype,
        "is_input": rec.is_input,
        "step": st.step,
        "positions": [st.start, st.start + n],
        "module_path": rec.module_path,
    }
    if encoding == "base64":  # bfloat16 stays bits: its dtype says how to read them
        entry["data_base64"] = base64.b64encode(raw.astype(raw.dtype.newbyteorder("<"), copy=False)).decode()
        entry["encoding"] = "base64"
    else:
        # orjson with OPT_SERIALIZE_NUMPY writes the nested lists; JSON shows bfloat16's values.
        entry["data"] = bfloat16_to_float32(raw) if rec.dtype == "bfloat16" else raw
    return entry


def entries_for_steps(records: list, steps: set[int] | None = None, encoding: str = "json") -> dict:
    """{hook_id: [entry, ...]} in step order, input before output within a step."""
    out: dict[str, list[tuple[int, bool, dict]]] = {}
    for rec in records:
        for st in rec.steps:
            if steps is None or st.step in steps:
                out.setdefault(rec.hook_id, []).append((st.step, not rec.is_input, step_entry(rec, st, encoding)))
    return {hook_id: [e for _, _, e in sorted(items, key=lambda x: (x[0], x[1]))] for hook_id, items in out.items()}


def inline_activations(capture, encoding: str = "json") -> dict:
    return entries_for_steps(capture.hooks, None, encoding)
