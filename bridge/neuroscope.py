"""Hook specs for NeuroScope's analyses, and captures converted into NeuroScope's format.

The format (`neuroscope.activations/1`, specified in docs/neuroscope-format.md):

    {"format": "neuroscope.activations/1",
     "model_id": str, "capture_id": str | None,
     "tokens": [str, ...],          # text of every position (prompt, then generated)
     "token_ids": [int, ...],       # may be empty (a streamed inline capture carries no ids)
     "prompt_tokens": int | None,
     "layers": {layer_key: {component_key: tensor}}}

    layer_key: "transformer.h.N" (decoder layer N), "transformer.wte" (embedding),
               "transformer.ln_f" (final norm)
    component_key: the component ("residual", "attention_pattern", ...); ".input" appended
               for a capture_input tensor; a second hook with the same key is stored under
               its hook_id instead.
    tensor: {"data": np.ndarray float32 (C-contiguous, shape == "shape"),
             "shape": [...], "dims": [...], "dtype": "float32", "source_dtype": str,
             "component", "is_input", "hook_id", "layer_name", "module_path", "layer",
             "positions": [int per row of the seq axis], "tokens": [str per row],
             "key_tokens": [str per key]   (attention only)}
      vectors (embedding, residual, attention, mlp, layernorm): [1, seq, d_model]
      per head (query, key, value):                            [1, seq, n_heads, d_head]
      attention (attention_scores, attention_pattern):         [n_heads, seq, n_keys]

Steps are concatenated along seq (prefill rows, then one row per decode step). A decode
step's attention row covers the keys seen so far; it is padded to n_keys with what the
causal mask gives: 0.0 for patterns, -inf for scores. With activation_positions "all"
(the default) seq == n_keys == len(tokens): the full causal seq x seq matrix per head.

float32 captures convert losslessly; float16 and bfloat16 are widened to float32 exactly.
`to_jsonable` gives the JSON form NeuroScope's JavaScript side reads ({data, shape, dtype},
data as base64 of little-endian float32, one Float32Array view).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from shm.format import stack_token_major
from vocabulary import COMPONENT_NAMES, COMPONENTS, EMBEDDING_LAYER, neuroscope_layer_name

FORMAT = "neuroscope.activations/1"


def neuroscope_dims(component: str, rank: int) -> list[str]:
    """The axis names of a NeuroScope tensor: key-padded components (scores, patterns) are
    [head, query, key]; every other component is a batch of one, [batch, seq, *per-token]."""
    comp = COMPONENTS.get(component)
    if comp is not None and comp.key_pad is not None and rank == 3:
        return ["head", "query", "key"]
    if comp is not None and rank == 2 + len(comp.dim_names):
        return ["batch", "seq", *comp.dim_names]
    return ["batch", "seq"] + [f"dim{i}" for i in range(rank - 2)]


# --- the intermediate form: one hook, token-major rows ----------------------------------
@dataclass
class HookRows:
    """One hook's tensor over a whole capture, token-major: `data[rows, *per_token]` float32
    (attention: [rows, n_heads, n_keys], keys padded), with each row's step and position."""

    hook_id: str
    layer_name: str
    module_path: str
    layer: int | None
    component: str
    is_input: bool
    source_dtype: str
    data: np.ndarray
    step: np.ndarray
    position: np.ndarray


# Servers before `layer_index` was part of every entry: the decoder layer from a name.
_LAYER_IN_PATH = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def _entry_layer(entry: dict) -> int | None:
    """The entry's decoder layer: its `layer_index` (None for the embedding and the final
    norm); only entries of older servers, which lack it, fall back to parsing the names."""
    if "layer_index" in entry:
        return entry["layer_index"]
    for text in (entry.get("module_path"), entry.get("layer_name")):
        m = _LAYER_IN_PATH.search(text or "")
        if m:
            return int(m.group(1))
    return None


def rows_from_entries(activations: dict) -> list[HookRows]:
    """The server's inline {hook_id: [entry per step]} -> HookRows (one per hook/direction)."""
    from bridge.client import entry_array

    out: list[HookRows] = []
    for hook_id, entries in activations.items():
        groups: dict[bool, list[dict]] = {}
        for e in entries:
            if "handle" in e and "data" not in e and "data_base64" not in e:
                raise ValueError(f"hook {hook_id!r}: a shared-memory entry has no data; convert the ShmCapture")
            groups.setdefault(bool(e.get("is_input")), []).append(e)
        for is_input in sorted(groups):  # input before output, as the server orders them
            es = sorted(groups[is_input], key=lambda e: e.get("step", 0))
            first = es[0]
            comp = first["component"]
            if comp not in COMPONENTS:
                raise ValueError(f"hook {hook_id!r}: unknown component {comp!r}; valid: {', '.join(COMPONENTS)}")
            axis = COMPONENTS[comp].token_axis
            arrays = [entry_array(e) for e in es]
            steps, positions = [], []
            for e, a in zip(es, arrays):
                n = a.shape[axis]
                start, stop = (e.get("positions") or [None, None])[:2]
                if start is None:
                    start = positions[-1][-1] + 1 if positions else 0
                    stop = start + n
                if stop - start != n:
                    raise ValueError(f"hook {hook_id!r} step {e.get('step')}: positions {e.get('positions')} "
                                     f"do not match {n} rows")
                positions.append(np.arange(start, stop, dtype=np.int64))
                steps.append(np.full(n, int(e.get("step", 0)), dtype=np.int64))
            data = stack_token_major(comp, arrays)  # the shm column's layout: [rows, *per_token], keys padded
            out.append(HookRows(
                hook_id=hook_id, layer_name=first.get("layer_name", hook_id),
                module_path=first.get("module_path", ""), layer=_entry_layer(first),
                component=comp, is_input=is_input, source_dtype=first.get("dtype", "float32"),
                data=data.astype(np.float32, copy=False),
                step=np.concatenate(steps), position=np.concatenate(positions),
            ))
    return out


def rows_from_view(view) -> list[HookRows]:
    """An `shm.CaptureView` (shared memory, HTTP bytes or an exported file) -> HookRows
    (copies: the result stays valid after the view is closed)."""
    out = []
    step = np.asarray(view.step, dtype=np.int64)
    position = np.asarray(view.position, dtype=np.int64)
    for h in view.hooks.values():
        info = h.info
        data = h.to_float32() if info.dtype != "float32" else np.array(h.data, dtype=np.float32, copy=True)
        out.append(HookRows(
            hook_id=info.hook_id, layer_name=info.layer_name, module_path=info.module_path,
            layer=info.layer_index,  # the stream's field metadata always carries it
            component=info.component, is_input=bool(info.is_input), source_dtype=info.dtype,
            data=data, step=step.copy(), position=position.copy(),
        ))
    return out


def capture_rows(capture: Any) -> tuple[dict, list[HookRows]]:
    """(capture metadata, HookRows) of any capture the bridge knows: an inline response dict
    (`ActivationResult`, a streamed result, plain JSON), a `ShmCapture`, or an
    `shm.CaptureView` (shared memory, HTTP, file)."""
    from bridge.client import ShmCapture

    if isinstance(capture, ShmCapture):
        if capture.view is None:
            raise ValueError(f"capture {capture.capture_id} is closed; convert it before closing")
        meta = _view_meta(capture.view)
        if not meta["tokens"]:
            meta["tokens"] = capture.tokens
        return meta, rows_from_view(capture.view)
    if hasattr(capture, "hooks") and hasattr(capture, "info") and hasattr(capture, "step"):
        return _view_meta(capture), rows_from_view(capture)
    if isinstance(capture, dict):
        if "activations" not in capture:
            raise ValueError("not a capture: the response has no 'activations' (was it a plain chat request?)")
        usage = capture.get("usage") or {}
        meta = {
            "model_id": capture.get("model"),
            "capture_id": (capture.get("capture") or {}).get("capture_id"),
            "tokens": list(capture.get("tokens") or []),
            "token_ids": list(capture.get("token_ids") or []),
            "prompt_tokens": usage.get("prompt_tokens"),
        }
        return meta, rows_from_entries(capture["activations"])
    raise TypeError(f"cannot convert {type(capture).__name__}: expected an inline response, a ShmCapture "
                    "or an shm CaptureView")


def _view_meta(view) -> dict:
    return {"model_id": view.model_id, "capture_id": view.capture_id, "tokens": list(view.tokens),
            "token_ids": list(view.token_ids), "prompt_tokens": view.prompt_tokens}


# --- NeuroScope's layout -------------------------------------------------------------------
def _label(tokens: list[str], p: int) -> str:
    return tokens[p] if 0 <= p < len(tokens) else ""


def tensor_from_rows(r: HookRows, tokens: list[str]) -> dict:
    comp = r.component
    keyed = comp in COMPONENTS and COMPONENTS[comp].key_pad is not None  # attention scores / pattern
    if keyed:
        data = np.ascontiguousarray(r.data.transpose(1, 0, 2))  # [H, seq, keys]
    else:
        data = np.ascontiguousarray(r.data[None])  # batch of 1
    positions = [int(p) for p in r.position]
    t = {
        "data": data,
        "shape": list(data.shape),
        "dims": neuroscope_dims(comp, data.ndim),
        "dtype": "float32",
        "source_dtype": r.source_dtype,
        "component": comp,
        "is_input": r.is_input,
        "hook_id": r.hook_id,
        "layer_name": r.layer_name,
        "module_path": r.module_path,
        "layer": r.layer,
        "positions": positions,
        "tokens": [_label(tokens, p) for p in positions],
    }
    if keyed:
        t["key_tokens"] = [_label(tokens, k) for k in range(data.shape[-1])]
    return t


def to_neuroscope(capture: Any) -> dict:
    """Convert a capture (inline response, ShmCapture, CaptureView) into NeuroScope's format."""
    meta, rows = capture_rows(capture)
    tokens = meta["tokens"]
    layers: dict[str, dict[str, dict]] = {}
    for r in rows:
        layer_key = neuroscope_layer_name(r.layer, r.component)
        comps = layers.setdefault(layer_key, {})
        suffix = ".input" if r.is_input else ""
        key = r.component + suffix
        if key in comps:
            key = r.hook_id + suffix
            n = 2
            while key in comps:
                key, n = f"{r.hook_id}{suffix}#{n}", n + 1
        comps[key] = tensor_from_rows(r, tokens)
    return {"format": FORMAT, **meta, "layers": layers}


def iter_tensors(ns: dict) -> Iterable[tuple[str, str, dict]]:
    for layer, comps in ns["layers"].items():
        for comp, t in comps.items():
            yield layer, comp, t


def to_jsonable(ns: dict, encoding: str = "base64") -> dict:
    """NeuroScope's JSON form: every tensor's `data` as base64 of little-endian float32
    (`encoding` "base64", exact, what a Float32Array reads) or as nested lists ("list";
    JSON has no -inf: masked scores become null)."""
    if encoding not in ("base64", "list"):
        raise ValueError("encoding must be 'base64' or 'list'")
    out = {k: v for k, v in ns.items() if k != "layers"}
    out["encoding"] = encoding
    out["layers"] = {}
    for layer, comp, t in iter_tensors(ns):
        j = {k: v for k, v in t.items() if k != "data"}
        a = np.ascontiguousarray(t["data"], dtype="<f4")
        if encoding == "base64":
            j["data"] = base64.b64encode(a.tobytes()).decode("ascii")
        else:
            j["data"] = _nonfinite_to_none(a.tolist())
        j["encoding"] = encoding
        out["layers"].setdefault(layer, {})[comp] = j
    return out


def _nonfinite_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nonfinite_to_none(v) for v in x]
    return x if np.isfinite(x) else None


def from_jsonable(obj: dict) -> dict:
    """The inverse of `to_jsonable` (exact for base64; for lists, null -> -inf in scores, NaN elsewhere)."""
    out = {k: v for k, v in obj.items() if k not in ("layers", "encoding")}
    out["layers"] = {}
    for layer, comps in obj["layers"].items():
        for comp, j in comps.items():
            t = {k: v for k, v in j.items() if k not in ("data", "encoding")}
            shape = tuple(j["shape"])
            if j.get("encoding", obj.get("encoding")) == "base64":
                a = np.frombuffer(base64.b64decode(j["data"]), "<f4").astype(np.float32).reshape(shape)
            else:
                a = np.array(j["data"], dtype=np.float32).reshape(shape)
                if j.get("component") == "attention_scores":
                    a[np.isnan(a)] = -np.inf
            t["data"] = a
            out["layers"].setdefault(layer, {})[comp] = t
    return out


# --- the original design's bridge -------------------------------------------------------
def _layer_list(model_layers: int | Iterable[int]) -> list[int]:
    if isinstance(model_layers, (int, np.integer)):
        if model_layers < 0:
            raise ValueError("model_layers must be a layer count >= 0 or a list of layer indices")
        return list(range(int(model_layers)))
    layers = [int(i) for i in model_layers]
    if any(i < 0 for i in layers):
        raise ValueError(f"layer indices must be >= 0, got {layers}")
    return layers


class NeuroScopeActivationBridge:
    """Hook specs for NeuroScope's analyses and conversion of captures into its format.

    `client` (optional) is an `LMStudioNeuroScopeClient`, used by `capture()`."""

    def __init__(self, client: Any = None):
        self.client = client

    # hook specs (the original design's names)
    @staticmethod
    def create_hook_specs_for_circuit_analysis(model_layers: int | Iterable[int],
                                               components: Iterable[str] = ("residual", "attention", "mlp"),
                                               capture_input: bool = False) -> list[dict]:
        """One hook per (layer, component): `model_layers` is a layer count (all layers) or a
        list of layer indices; names are NeuroScope's `transformer.h.N` (the embedding, if
        asked for, is one hook on `transformer.wte`)."""
        components = [components] if isinstance(components, str) else list(components)
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise ValueError(f"unknown components {bad}; valid: {', '.join(COMPONENT_NAMES)}")
        hooks: list[dict] = []
        if "embedding" in components:
            hooks.append({"layer_name": EMBEDDING_LAYER, "component": "embedding",
                          "hook_id": f"{EMBEDDING_LAYER}.embedding", "capture_input": False, "capture_output": True})
        for i in _layer_list(model_layers):
            for c in components:
                if c == "embedding":
                    continue
                hooks.append({"layer_name": f"transformer.h.{i}", "component": c,
                              "hook_id": f"transformer.h.{i}.{c}",
                              "capture_input": bool(capture_input) and COMPONENTS[c].has_input,
                              "capture_output": True})
        return hooks

    @staticmethod
    def create_attention_analysis_hooks(model_layers: int | Iterable[int],
                                        target_layers: Iterable[int] | None = None,
                                        include_scores: bool = False) -> list[dict]:
        """The attention pattern and the attention output of each target layer (default: all
        of `model_layers`). Negative targets count from the end when `model_layers` is a count."""
        layers = _layer_list(model_layers)
        if target_layers is None:
            targets = layers
        else:
            targets = []
            for t in target_layers:
                t = int(t)
                if t < 0 and isinstance(model_layers, (int, np.integer)):
                    t += int(model_layers)
                if t not in layers:
                    raise ValueError(f"target layer {t} is not among the model's layers {layers[:3]}..{layers[-3:]}")
                targets.append(t)
        comps = ["attention_pattern", "attention"] + (["attention_scores"] if include_scores else [])
        return [{"layer_name": f"transformer.h.{i}", "component": c, "hook_id": f"transformer.h.{i}.{c}",
                 "capture_input": False, "capture_output": True} for i in targets for c in comps]

    # conversion
    @staticmethod
    def convert_activations_for_neuroscope(capture: Any) -> dict:
        """A capture (inline response, ShmCapture, CaptureView) -> NeuroScope's format."""
        return to_neuroscope(capture)

    to_neuroscope = convert_activations_for_neuroscope

    @staticmethod
    def to_jsonable(ns: dict, encoding: str = "base64") -> dict:
        return to_jsonable(ns, encoding)

    def capture(self, messages: Any = None, hooks: list[dict] | None = None, transport: str = "shm", *,
                prompt: Any = None, **kw) -> dict:
        """Generate with `hooks` through the client and return NeuroScope's format; with
        shm the capture is converted, then unmapped and released. The input is `messages` (a
        chat; a str is one user message) or `prompt=` (raw text or token ids, no chat template)."""
        if self.client is None:
            raise ValueError("this bridge has no client: NeuroScopeActivationBridge(client)")
        result = self.client.generate_with_activations(messages, hooks, transport=transport, prompt=prompt, **kw)
        if transport == "shm" and hasattr(result, "close"):
            with result:
                ns = to_neuroscope(result)
                ns["text"] = result.text
                return ns
        ns = to_neuroscope(result)
        ns["text"] = result.text
        return ns

    # interventions, vectors and patching: thin pass-throughs to the client
    def _client(self) -> Any:
        if self.client is None:
            raise ValueError("this bridge has no client: NeuroScopeActivationBridge(client)")
        return self.client

    def intervene(self, messages: Any = None, interventions: Iterable | None = None, *, prompt: Any = None,
                  **kw) -> Any:
        """A completion with `interventions` applied (the client's `chat(..., interventions=...)`;
        `prompt=` (raw text or token ids instead of `messages`), `baseline=True`, `logprobs`,
        `logprob_token_ids`, ... pass through)."""
        return self._client().chat(messages, interventions=interventions, prompt=prompt, **kw)

    def compare_with_baseline(self, messages: Any = None, interventions: Iterable | None = None, *,
                              prompt: Any = None, **kw) -> tuple:
        """(steered, baseline) completions from one request (see the client's method); `prompt=`
        instead of `messages` for raw text or token ids."""
        return self._client().compare_with_baseline(messages, interventions, prompt=prompt, **kw)

    def logit_difference(self, prompt: Any, target: int, foil: int, interventions: Iterable | None = None,
                         **kw) -> float:
        """logit(target) - logit(foil) at the first generated token (token ids). `prompt`: a str
        or a list of token ids is a raw prompt (no chat template), a list of message dicts a chat
        (unlike `intervene`/`chat`, where a bare str is one user message)."""
        return self._client().logit_difference(prompt, target, foil, interventions, **kw)

    def patching_sweep(self, clean: Any, corrupted: Any, target: int, foil: int, **kw) -> Any:
        """Activation patching sweep -> `PatchingResult` (see the client's `patching_sweep`).
        `clean`, `corrupted`: a str or a list of token ids is a raw prompt (no chat template), a
        list of message dicts a chat."""
        return self._client().patching_sweep(clean, corrupted, target, foil, **kw)

    def create_steering_vector(self, vector: Any = None, **kw) -> dict:
        """Store a steering vector on the server (the client's `create_vector`: a list or numpy
        array, `data`, or `from_capture`; `name`, `layer`) -> its description; use its
        `vector_id` in {"op": "add", "layer_name": ..., "vector_id": ..., "coefficient": ...}."""
        return self._client().create_vector(vector, **kw)

    def create_vector(self, vector: Any = None, **kw) -> dict:
        return self._client().create_vector(vector, **kw)

    def list_vectors(self) -> list[dict]:
        return self._client().list_vectors()

    def get_vector(self, vector_id: Any) -> dict:
        return self._client().get_vector(vector_id)

    def delete_vector(self, vector_id: Any) -> dict:
        return self._client().delete_vector(vector_id)

    def import_control_vector(self, path_or_bytes: Any, name: str | None = None) -> list[dict]:
        return self._client().import_control_vector(path_or_bytes, name)


# --- analysis helpers used by the examples -----------------------------------------------
def attention_summary(ns: dict, query_position: int, exclude_first: bool = True) -> list[dict]:
    """For each layer/head with an attention pattern: the earlier key the token at
    `query_position` attends to most (ignoring the query itself and, with `exclude_first`,
    position 0, the usual attention sink)."""
    out = []
    for layer, comps in ns["layers"].items():
        t = comps.get("attention_pattern")
        if t is None:
            continue
        rows = t["positions"]
        if query_position not in rows:
            continue
        q = rows.index(query_position)
        pat = t["data"][:, q, :]  # [H, keys]
        lo = 1 if exclude_first else 0
        for h in range(pat.shape[0]):
            cand = pat[h, lo:query_position]
            if cand.size == 0:
                continue
            k = lo + int(np.argmax(cand))
            out.append({"layer": layer, "head": h, "key_position": k, "key_token": t["key_tokens"][k],
                        "weight": float(pat[h, k])})
    return out


__all__ = [
    "FORMAT",
    "HookRows",
    "NeuroScopeActivationBridge",
    "attention_summary",
    "capture_rows",
    "from_jsonable",
    "iter_tensors",
    "neuroscope_layer_name",
    "rows_from_entries",
    "rows_from_view",
    "to_jsonable",
    "to_neuroscope",
]
