"""Interventions: changing a tensor of the model while it generates, from plain data.

A client sends `InterventionSpec`s (engine/params.py). `resolve_interventions` checks each
against the loaded model (site, heads, indices, the vector's shape, a patch source's site and
positions) and turns it into an `Intervention`, whose `apply` edits one forward step's tensor.
The capture (engine/capture.py) calls it at the site, before recording, so hooks see the
intervened values, and key/value edits are written back into the KV cache, so every later
token attends to the intervened keys and values.

Positions are absolute token positions of the sequence (the prompt's, then each generated
token's); a step covers the window [start, start + T). Nothing is computed at a step the
intervention does not touch, so steering the prompt only costs nothing while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import mlx.core as mx
import numpy as np

import vocabulary
from engine.errors import InvalidArgument, UnknownHook
from engine.hooks import resolve_site
from engine.model import LoadedModel
from engine.params import InterventionSpec, parse_list

_OP_FIELDS = {  # which optional fields each op takes
    "zero": (), "scale": ("coefficient",), "add": ("coefficient", "vector"), "set": ("vector",),
    "project_out": ("coefficient", "vector"), "clamp": ("min", "max"), "patch": ("source",),
}
_OPTIONAL = ("coefficient", "vector", "min", "max", "source")


@dataclass(frozen=True)
class SourceTensor:
    """A captured tensor to patch in: its site, the positions it holds and one row per position."""

    component: str
    layer: int | None
    is_input: bool
    positions: np.ndarray  # [rows] absolute token positions
    data: np.ndarray  # [rows, *per_token] (token-major, as stored), float32
    prompt_tokens: int  # the source run's prompt length


class VectorLookup(Protocol):
    def get(self, vector_id: str) -> Any: ...  # an object with `.data` (np.ndarray); raises for unknown ids


Sources = Callable[[str, str], SourceTensor]  # (capture_id, hook_id) -> the tensor; raises InvalidArgument


@dataclass(frozen=True, eq=False)
class Intervention:
    """A resolved intervention. Arrays are in the site's engine layout with the batch axis:
    [1, T, n] for vectors ([1, H, T, n] for per-head sites); `vector` broadcasts against it."""

    index: int
    spec: InterventionSpec
    site: str
    layer: int | None
    component: str
    is_input: bool
    positions: str | np.ndarray  # "all" | "prompt" | "generated" | sorted absolute positions
    prompt_tokens: int
    heads: np.ndarray | None
    indices: np.ndarray | None
    vector: mx.array | None = None  # add / set / project_out (a unit vector for project_out)
    patch: SourceTensor | None = None

    @property
    def per_head(self) -> bool:
        return vocabulary.COMPONENTS[self.component].per_head

    def rows(self, start: int, n: int) -> np.ndarray:
        """The step's rows (0..n-1) this intervention touches."""
        if isinstance(self.positions, str):
            first = {"all": start, "prompt": start, "generated": max(start, self.prompt_tokens)}[self.positions]
            last = min(start + n, self.prompt_tokens) if self.positions == "prompt" else start + n
            return np.arange(max(first, start), max(last, first)) - start
        p = self.positions
        return p[(p >= start) & (p < start + n)] - start

    def apply(self, x: mx.array, start: int) -> tuple[mx.array, int]:
        """The step's tensor `x` (batch 1) with this intervention applied, and how many positions
        it touched. Unchanged (the same array) when it touches none."""
        token_axis = 2 if self.per_head else 1
        n = x.shape[token_axis]
        rows = self.rows(start, n)
        if not len(rows):
            return x, 0
        new = self._changed(x, start, rows, token_axis)
        mask = self._mask(x.shape, rows, token_axis)
        return (new if mask is None else mx.where(mask, new, x)), len(rows)

    def _changed(self, x: mx.array, start: int, rows: np.ndarray, token_axis: int) -> mx.array:
        op, spec = self.spec.op, self.spec
        if op == "zero":
            return mx.zeros_like(x)
        if op == "scale":
            return x * spec.coefficient
        if op == "add":
            return x + (1.0 if spec.coefficient is None else spec.coefficient) * self.vector.astype(x.dtype)
        if op == "set":
            return mx.broadcast_to(self.vector.astype(x.dtype), x.shape)
        if op == "project_out":
            u = self.vector.astype(x.dtype)
            c = 1.0 if spec.coefficient is None else spec.coefficient
            return x - c * (x * u).sum(axis=-1, keepdims=True) * u
        if op == "clamp":
            return mx.clip(x, spec.min, spec.max)
        return self._patched(x.shape, x.dtype, start, rows, token_axis)

    def _patched(self, shape, dtype, start: int, rows: np.ndarray, token_axis: int) -> mx.array:
        src = self.patch
        out = np.zeros(shape, np.float32)
        at = np.searchsorted(src.positions, rows + start)  # every row is in the source (checked when resolved)
        values = src.data[at]  # [rows, *per_token]
        if token_axis == 2:
            out[0][:, rows] = values.transpose(1, 0, 2)
        else:
            out[0, rows] = values
        return mx.array(out).astype(dtype)

    def _mask(self, shape, rows: np.ndarray, token_axis: int) -> mx.array | None:
        """Where the change applies, broadcastable to `shape`; None: everywhere."""
        parts = []
        if len(rows) < shape[token_axis]:
            parts.append((token_axis, rows))
        if self.heads is not None and self.per_head:
            parts.append((1, self.heads))
        if self.indices is not None:
            parts.append((len(shape) - 1, self.indices))
        if not parts:
            return None
        mask = None
        for axis, chosen in parts:
            m = np.zeros(shape[axis], bool)
            m[chosen] = True
            m = m.reshape([shape[axis] if a == axis else 1 for a in range(len(shape))])
            mask = m if mask is None else mask & m
        return mx.array(mask)

    def report(self, touched: Iterable[int]) -> dict:
        """What the response says about this intervention: which it was, and how many positions
        it touched at each step (0 = the prompt)."""
        return {"index": self.index, "layer_name": self.spec.layer_name, "component": self.component,
                "op": self.spec.op, "positions_touched": list(touched)}


def intervention_specs(values: Iterable[InterventionSpec | dict], arg: str = "interventions") -> list[InterventionSpec]:
    """InterventionSpecs from specs or plain dicts (validated; errors name `interventions[i].field`)."""
    return parse_list(InterventionSpec, values, arg, "layer_name, component, op, ...")


def resolve_interventions(lm: LoadedModel, specs: list[InterventionSpec], prompt_tokens: int, *,
                          vectors: VectorLookup | None = None, sources: Sources | None = None,
                          arg: str = "interventions") -> list[Intervention]:
    """Check each spec against the model and resolve it, in order (the order they apply in at a
    shared site). Errors are InvalidArgument (UnknownHook for a name the model lacks) naming
    `interventions[i].field`."""
    return [_resolve(lm, spec, i, prompt_tokens, vectors, sources, f"{arg}[{i}]") for i, spec in enumerate(specs)]


def _resolve(lm, spec: InterventionSpec, index: int, prompt_tokens: int, vectors, sources, where: str) -> Intervention:
    def fail(message: str, field: str | None = None, kind=InvalidArgument):
        raise kind(f"{where}: {message}", f"{where}.{field}" if field else where)

    try:
        site = resolve_site(lm, spec.layer_name, spec.component)
    except vocabulary.VocabularyError as exc:
        kind = InvalidArgument if exc.field == "component" and spec.component is None else UnknownHook
        fail(exc.message, exc.field, kind)
    component = vocabulary.COMPONENTS[site.component]
    refusal = vocabulary.intervention_refusal(site, named_by_component=spec.component is not None)
    if refusal is not None:
        fail(*refusal)

    given = [f for f in _OPTIONAL if getattr(spec, f) is not None] + (["vector"] if spec.vector_id else [])
    for f in given:
        if f not in _OP_FIELDS[spec.op]:
            fail(f"'{f}' does not apply to op '{spec.op}' (it takes: {', '.join(_OP_FIELDS[spec.op]) or 'nothing'})",
                 "vector_id" if f == "vector" and spec.vector is None else f)
    if spec.op == "scale" and spec.coefficient is None:
        fail("op 'scale' needs a 'coefficient' (the factor)", "coefficient")
    if spec.op == "clamp" and spec.min is None and spec.max is None:
        fail("op 'clamp' needs 'min', 'max' or both", "min")
    if spec.op == "clamp" and None not in (spec.min, spec.max) and spec.min > spec.max:
        fail(f"min ({spec.min}) is above max ({spec.max})", "min")
    if spec.op in ("add", "set", "project_out") and (spec.vector is None) == (spec.vector_id is None):
        fail(f"op '{spec.op}' needs exactly one of 'vector' (inline numbers) or 'vector_id' (a stored vector)",
             "vector")
    if spec.op == "patch" and spec.source is None:
        fail("op 'patch' needs a 'source': {capture_id, hook_id} of a capture kept on the server", "source")

    dims = lm.info.dims
    sizes = [dims[s] for s in component.sizes]  # per-token sizes: [n] or [heads, n]
    last = sizes[-1]
    heads = indices = None
    if spec.heads is not None:
        if not component.per_head:
            fail(f"'heads' applies to per-head sites (query, key, value, head_output), not {site.component}", "heads")
        bad = [h for h in spec.heads if h >= sizes[0]]
        if bad:
            fail(f"head {bad[0]} does not exist: {site.component} has {sizes[0]} heads, numbered 0 to {sizes[0] - 1}",
                 "heads")
        heads = np.unique(np.array(spec.heads))
    if spec.indices is not None:
        bad = [k for k in spec.indices if k >= last]
        if bad:
            fail(f"index {bad[0]} is past the last axis of {site.component}, which has {last} entries "
                 f"(0 to {last - 1})", "indices")
        indices = np.unique(np.array(spec.indices))
    if isinstance(spec.positions, list):
        positions: str | np.ndarray = np.unique(np.array(spec.positions))
    else:
        positions = spec.positions

    vector = patch = None
    if spec.op in ("add", "set", "project_out"):
        vector = _vector(spec, vectors, sizes, indices, component.per_head, fail)
    if spec.op == "patch":
        patch, positions = _patch_source(spec, site, positions, prompt_tokens, sizes, sources, fail)
    return Intervention(index, spec, site.site, site.layer, site.component, bool(site.is_input), positions,
                        prompt_tokens, heads, indices, vector, patch)


def _vector(spec: InterventionSpec, vectors, sizes: list[int], indices, per_head: bool, fail) -> mx.array:
    """The op's vector as an array that broadcasts over the site's engine layout."""
    field = "vector" if spec.vector is not None else "vector_id"
    if spec.vector is not None:
        try:
            data = np.array(spec.vector, dtype=np.float32)
        except ValueError:
            fail("'vector' is ragged: give a list of numbers, or a list of equal-length lists (one per head)",
                 "vector")
    else:
        if vectors is None:
            fail("there are no stored vectors to take 'vector_id' from", "vector_id")
        try:
            data = np.asarray(vectors.get(spec.vector_id).data, dtype=np.float32)
        except InvalidArgument as exc:  # an unknown id is a bad value in this request (400), not a missing page
            fail(exc.message, "vector_id")
    if not np.isfinite(data).all():
        fail("the vector has non-finite values (NaN or infinity)", field)
    last = sizes[-1] if indices is None else len(indices)
    what = f"{sizes[-1]} (the site's last axis)" if indices is None else f"{last} (one per index)"
    if data.ndim == 1:
        if data.shape[0] != last:
            fail(f"the vector has {data.shape[0]} numbers but this site needs {what}", field)
    elif data.ndim == 2 and per_head:
        if data.shape != (sizes[0], last):
            fail(f"a per-head vector must be [{sizes[0]}, {last}] (heads, n); got {list(data.shape)}", field)
    else:
        fail(f"the vector must be 1-D [{last}]" + (f" or [heads, {last}]" if per_head else "") +
             f"; got shape {list(data.shape)}", field)
    if spec.op == "project_out":
        norm = np.linalg.norm(data, axis=-1, keepdims=True)
        if (norm == 0).any():
            fail("op 'project_out' needs a non-zero vector (it removes the component along it)", field)
        data = data / norm
    if indices is not None:  # the chosen entries of the last axis; the rest stay 0 (and masked)
        full = np.zeros(data.shape[:-1] + (sizes[-1],), np.float32)
        full[..., indices] = data
        data = full
    if data.ndim == 2:  # [heads, n] -> [1, heads, 1, n] against [1, H, T, n]
        data = data[None, :, None, :]
    return mx.array(data)


def _patch_source(spec: InterventionSpec, site, positions, prompt_tokens: int, sizes: list[int], sources, fail):
    """The source tensor, checked against the site, and the positions to patch: the requested
    ones that the source holds (an explicit position it lacks is an error)."""
    if sources is None:
        fail("no captures are kept here to patch from", "source")
    try:
        src = sources(spec.source.capture_id, spec.source.hook_id)
    except InvalidArgument as exc:  # the source's own errors name `source.*`: put them under this intervention
        fail(exc.message, exc.arg)
    want = (site.component, site.layer, bool(site.is_input))
    got = (src.component, src.layer, src.is_input)
    if got != want:
        def say(c, layer, is_input):
            return f"{c}{' input' if is_input else ''} of " + ("layer " + str(layer) if layer is not None else "the model")
        fail(f"the source {spec.source.hook_id!r} is the {say(*got)} but this intervention changes the {say(*want)}; "
             "patch from a hook captured at the same site", "source.hook_id")
    if list(src.data.shape[1:]) != sizes:
        fail(f"the source's tensors are {list(src.data.shape[1:])} per token but this model's are {sizes}: was it "
             "captured on another model?", "source")
    held = np.asarray(src.positions)
    if not isinstance(positions, np.ndarray) and src.prompt_tokens != prompt_tokens:
        fail(f"the source's prompt has {src.prompt_tokens} tokens but this one has {prompt_tokens}, so its "
             f"positions do not line up; use prompts of equal token counts, or list the positions to patch",
             "positions")
    if isinstance(positions, np.ndarray):
        missing = np.setdiff1d(positions, held)
        if len(missing):
            fail(f"the source holds positions {_ranges(held)} but not {_ranges(missing)}; patch positions the "
                 "clean run captured (capture them with activation_positions 'all')", "positions")
        chosen = positions
    else:
        chosen = {"all": held, "prompt": held[held < prompt_tokens], "generated": held[held >= prompt_tokens]}[positions]
    if not len(chosen):
        fail(f"the source holds no {positions} positions to patch", "positions")
    order = np.argsort(held, kind="stable")
    src = SourceTensor(src.component, src.layer, src.is_input, held[order], np.asarray(src.data, np.float32)[order],
                       src.prompt_tokens)
    return src, np.unique(chosen)


def _ranges(positions: np.ndarray) -> str:
    p = sorted(int(x) for x in positions)
    runs, start = [], None
    for i, x in enumerate(p):
        if start is None:
            start = x
        if i + 1 == len(p) or p[i + 1] != x + 1:
            runs.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(runs[:8]) + (", ..." if len(runs) > 8 else "")


def sources_from(*captures: Any) -> Sources:
    """Patch sources from captures in this process (engine Completions' `.capture`), for the
    engine API; the server reads them from shared memory instead."""
    by_id = {c.capture_id: c for c in captures}

    def source(capture_id: str, hook_id: str) -> SourceTensor:
        cap = by_id.get(capture_id)
        if cap is None:
            raise InvalidArgument(f"no capture {capture_id!r} among the ones given: {', '.join(by_id) or 'none'}",
                                  "source.capture_id")
        recs = [r for r in cap.hooks if r.hook_id == hook_id and r.steps]
        if not recs:
            raise InvalidArgument(f"capture {capture_id!r} has no hook {hook_id!r}; it has "
                                  f"{', '.join(sorted({r.hook_id for r in cap.hooks}))}", "source.hook_id")
        rec = recs[0]  # the output when both directions were captured, as column names go
        positions = np.concatenate([np.arange(s.start, s.start + s.n_tokens) for s in rec.steps])
        return SourceTensor(rec.component, rec.layer_index, rec.is_input, positions,
                            rec.token_major().astype(np.float32), cap.prompt_tokens)

    return source
