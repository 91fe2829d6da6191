"""What one request does to the model while it generates: record tensors, and intervene.

MLX modules have no forward hooks. For the duration of one request we swap the class of each
module we need (embedding, decoder block, attention, MLP and its output projection, norms)
for a subclass whose `__call__` calls the original, applies the request's interventions to
its input or output and keeps a reference to what it records; only those instances change,
parameter names stay. Q/K/V, scores, patterns and each head's output come from the attention
seam: the model file's `scaled_dot_product_attention`, which receives post-RoPE queries and
keys, keys/values joined with the KV cache, the mask and the scale. Scores and patterns are
computed beside the fused kernel, never instead of it, so without interventions logits stay
bit-identical. Key and value interventions are written back into the KV cache, so later
tokens attend to the changed keys and values.

Hooks only keep lazy array references; `end_step` hands them to the generation loop, which
evaluates them with the step's logits. Nothing is copied to numpy on the hot path.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from engine.errors import EngineError
from engine.hooks import HookTarget, module_path
from engine.interventions import Intervention
from engine.model import LoadedModel
from engine.params import CaptureOptions
from engine.records import HookRecord, StepTensor

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Only one capture may be installed at a time: generation is serialised by the server, and this
# lock makes a second, concurrent capture wait instead of seeing the first one's hooks.
_INSTALL_LOCK = threading.Lock()
_active: "Capture | None" = None
_tapped_classes: dict[type, type] = {}
# Sites whose tensor is what the module receives: the MLP's output projection takes the neurons.
_INPUT_SITES = ("mlp_post",)


def _takes_input(t: HookTarget | Intervention) -> bool:
    """Whether a target's tensor is what its module receives (an input, or an input site)."""
    return t.is_input or t.site in _INPUT_SITES


def _tapped_class(cls: type) -> type:
    """A subclass of `cls` whose __call__ reports (module, input, output) to the active capture."""
    sub = _tapped_classes.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            capture = _active
            if capture is None:
                return cls.__call__(self, *args, **kwargs)
            if not args:  # the tensor passed by keyword (gptj's blocks: x=...)
                name = next(iter(kwargs))
                return capture._on_module(self, cls, kwargs.pop(name), (), kwargs, name)
            return capture._on_module(self, cls, args[0], args[1:], kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        _tapped_classes[cls] = sub
    return sub


def attention_scores(queries: mx.array, keys: mx.array, scale: float, mask) -> mx.array:
    """Scaled pre-softmax scores [B, H, T_q, T_k] with the mask applied as the fused kernel does."""
    b, n_heads, t_q, d = queries.shape
    n_kv = keys.shape[1]
    # Grouped-query attention: broadcast each KV head over its query heads instead of copying
    # the whole cache n_heads / n_kv times (mx.repeat did, every layer and every step).
    q = (queries.astype(mx.float32) * scale).reshape(b, n_kv, n_heads // n_kv, t_q, d)
    k = keys.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    scores = (q @ k).reshape(b, n_heads, t_q, keys.shape[2])
    if mask is None:
        return scores
    if isinstance(mask, str):  # "causal": query i sits at absolute position T_k - T_q + i
        t_q, t_k = scores.shape[-2:]
        mask = mx.arange(t_k - t_q, t_k)[:, None] >= mx.arange(t_k)[None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(-mx.inf, dtype=scores.dtype))
    # An additive mask (multi-head latent attention passes its rotary scores so) marks a key never seen
    # with its dtype's minimum: softmax gives it exactly 0, as -inf does.
    return mx.where(mask <= mx.finfo(mask.dtype).min / 2, mx.array(-mx.inf, dtype=scores.dtype), scores + mask)


def attention_pattern(scores: mx.array, sinks: mx.array | None = None) -> mx.array:
    """Softmax of [..., H, T_q, T_k] scores. Attention sinks (gpt-oss: one learned logit per head)
    take part in the softmax and are then dropped, so a row may sum to less than one."""
    if sinks is None:
        return mx.softmax(scores, axis=-1, precise=True)
    sink = mx.broadcast_to(sinks.astype(scores.dtype)[:, None, None], (*scores.shape[:-1], 1))
    return mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1, precise=True)[..., :-1]


@contextmanager
def _installed(active, modules: list, seam_owner) -> Iterator:
    """Route `modules` (and the attention seam of `seam_owner`, unless None) to `active` (a
    Capture or a BatchCapture) until the block ends."""
    global _active
    with _INSTALL_LOCK:
        originals = [(m, type(m)) for m in modules]
        original_sdpa = getattr(seam_owner, "scaled_dot_product_attention", None) if seam_owner else None
        if seam_owner is not None and original_sdpa is None:
            raise RuntimeError(f"{seam_owner.__name__} has no scaled_dot_product_attention seam")
        try:
            for module, cls in originals:
                module.__class__ = _tapped_class(cls)
            if seam_owner is not None:
                seam_owner.scaled_dot_product_attention = active._seam(original_sdpa)
            _active = active
            yield active
        finally:
            _active = None
            for module, cls in originals:
                module.__class__ = cls
            if seam_owner is not None:
                seam_owner.scaled_dot_product_attention = original_sdpa


def _call_module(active, module, cls: type, x, args, kwargs, x_name: str | None, layer: int | None, after):
    """Call the original module on `x`; `after` maps its output tensor. `layer` (an attention
    module's) tells the seam which layer it is in while the module runs."""
    if layer is not None:
        active._seam_layer = layer
    try:
        out = cls.__call__(module, x, *args, **kwargs) if x_name is None else \
            cls.__call__(module, *args, **{x_name: x}, **kwargs)
    finally:
        active._seam_layer = None
    # A module may return a tuple whose first item is its tensor (gemma4_text's blocks and
    # attention also return the shared KV and the offset); the rest passes through untouched.
    if isinstance(out, tuple):
        return (after(out[0]), *out[1:])
    return after(out)


class Capture:
    """One request's hooks and interventions. Records: one HookRecord per (hook, direction), one
    StepTensor per step. `touched[i]`: positions intervention i changed at each step."""

    def __init__(self, lm: LoadedModel, targets: list[HookTarget], options: CaptureOptions = CaptureOptions(),
                 interventions: list[Intervention] = ()):
        self.options = options
        self.interventions = list(interventions)
        self.touched: list[list[int]] = [[] for _ in self.interventions]
        self._slot = {id(iv): i for i, iv in enumerate(self.interventions)}  # intervention -> its `touched` row
        self.records: list[HookRecord] = [
            HookRecord(
                hook_id=t.hook_id, layer_name=t.layer_name, module_path=module_path(lm, t), layer_index=t.layer,
                component=t.component, is_input=t.is_input, dtype=options.dtype,
            )
            for t in targets
        ]
        self._targets = targets
        self._dtype = _DTYPES[options.dtype]
        self._taps: dict[int, list[tuple[HookTarget, HookRecord]]] = {}  # id(module) -> what to keep
        self._sdpa_taps: dict[int, list[tuple[HookTarget, HookRecord]]] = {}  # layer -> q/k/v/scores/pattern
        self._edits: dict[int, list[Intervention]] = {}  # id(module) -> interventions there, in request order
        self._sdpa_edits: dict[int, list[Intervention]] = {}  # layer -> interventions on q/k/v/head_output
        self._attn_layer: dict[int, int] = {}  # id(attention module) -> layer, for the seam
        self._seam_layer: int | None = None
        self._step, self._start, self._recording = 0, 0, False
        self._pending: list[mx.array] = []
        self._modules = self._collect_modules(lm)

    def _collect_modules(self, lm: LoadedModel) -> list:
        arch, model = lm.arch, lm.model

        def site_module(t: HookTarget | Intervention):
            return arch.module(model, "attn" if t.site == "sdpa" else t.site, t.layer)

        modules = {}
        for t, rec in [*zip(self._targets, self.records), *((iv, None) for iv in self.interventions)]:
            module = site_module(t)
            modules[id(module)] = module
            if t.site == "sdpa":
                self._attn_layer[id(module)] = t.layer
                if rec is None:
                    self._sdpa_edits.setdefault(t.layer, []).append(t)
                else:
                    self._sdpa_taps.setdefault(t.layer, []).append((t, rec))
            elif rec is None:
                self._edits.setdefault(id(module), []).append(t)
            else:
                self._taps.setdefault(id(module), []).append((t, rec))
        self._seam_module = sys.modules[arch.seam] if arch.seam else None
        return list(modules.values())

    # --- installed for the duration of a generation -------------------------------------------
    @property
    def uses_seam(self) -> bool:
        return bool(self._sdpa_taps or self._sdpa_edits)

    def installed(self, lm: LoadedModel):
        """Context manager: this capture's taps on the model (the forward steps run inside it)."""
        return _installed(self, self._modules, self._seam_module if self.uses_seam else None)

    def begin_step(self, step: int, start: int) -> None:
        self._step, self._start = step, start
        positions = self.options.positions
        self._recording = positions == "all" or positions == "last" or (positions == "prompt") == (step == 0)
        self._pending = []
        for counts in self.touched:
            counts.append(0)

    def end_step(self) -> list[mx.array]:
        """The arrays recorded during this step, for the caller to evaluate with the logits."""
        pending, self._pending = self._pending, []
        return pending

    # --- recording ---------------------------------------------------------------------------
    def _keep(self, rec: HookRecord, array: mx.array, token_axis: int) -> None:
        """Record row 0 of `array` (the request's; `token_axis` counted without the batch axis)."""
        array = array[0]
        n = array.shape[token_axis]
        start = self._start
        if self.options.positions == "last" and n > 1:
            array = array[(slice(None),) * token_axis + (slice(-1, None),)]
            start += n - 1
        if array.dtype != self._dtype:
            array = array.astype(self._dtype)
        rec.steps.append(StepTensor(self._step, start, array))
        self._pending.append(array)

    def _intervene(self, edits: list[Intervention], x: mx.array, on_input: bool) -> mx.array:
        for iv in edits:
            if _takes_input(iv) == on_input:
                x, n = iv.apply(x, self._start)
                self.touched[self._slot[id(iv)]][-1] += n
        return x

    def _on_module(self, module, cls: type, x, args, kwargs, x_name: str | None = None):
        x = self._before(module, x)
        layer = self._attn_layer.get(id(module))
        return _call_module(self, module, cls, x, args, kwargs, x_name, layer,
                            lambda y: self._after(module, x, y))

    def _before(self, module, x: mx.array) -> mx.array:
        """The module's input with this request's input interventions there."""
        edits = self._edits.get(id(module))
        return self._intervene(edits, x, on_input=True) if edits else x

    def _after(self, module, x: mx.array, y: mx.array) -> mx.array:
        """The module's output with this request's output interventions; records what is tapped."""
        edits = self._edits.get(id(module))
        if edits:
            flat = y.ndim == 2 and edits[0].site == "router"  # a router fed flattened tokens (olmoe): [T, n_experts]
            y = self._intervene(edits, y[None] if flat else y, on_input=False)
            y = y[0] if flat else y
        if self._recording:
            for t, rec in self._taps.get(id(module), ()):
                kept = x if _takes_input(t) else y
                self._keep(rec, kept[None] if t.site == "router" and kept.ndim == 2 else kept, 0)
        return y

    def _seam(self, original):
        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, **kwargs):
            layer = self._seam_layer
            queries, keys, values = self._seam_before(layer, queries, keys, values, cache)
            out = original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
            return self._seam_after(layer, queries, keys, values, out, scale, mask, kwargs.get("sinks"))

        return scaled_dot_product_attention

    def _seam_before(self, layer, queries, keys, values, cache, row: tuple[int, int] | None = None):
        edits = self._sdpa_edits.get(layer, ()) if layer is not None else ()
        return self._edit_qkv(edits, queries, keys, values, cache, row) if edits else (queries, keys, values)

    def _seam_after(self, layer, queries, keys, values, out, scale, mask, sinks):
        """The attention output with head_output interventions; records q/k/v, scores, patterns
        and head outputs."""
        if layer is None:
            return out
        edits = self._sdpa_edits.get(layer, ())
        if edits:
            out = self._intervene([iv for iv in edits if iv.component == "head_output"], out, on_input=False)
        if not self._recording or layer not in self._sdpa_taps:
            return out
        t_q = queries.shape[2]
        scores = None
        for t, rec in self._sdpa_taps[layer]:
            if t.component == "head_output":
                self._keep(rec, out, 1)
            elif t.component == "query":
                self._keep(rec, queries, 1)
            elif t.component in ("key", "value"):  # this step's tokens; earlier ones are in earlier steps
                self._keep(rec, (keys if t.component == "key" else values)[:, :, -t_q:, :], 1)
            else:
                if scores is None:
                    scores = attention_scores(queries, keys, scale, mask)
                if t.component == "attention_scores":
                    self._keep(rec, scores, 1)
                else:
                    self._keep(rec, attention_pattern(scores, sinks), 1)
        return out

    def _edit_qkv(self, edits: list[Intervention], queries, keys, values, cache, row: tuple[int, int] | None = None):
        """Queries, keys and values with the step's interventions; changed keys and values are
        written back into the KV cache, which holds them for every later step (`row`: this
        request's row of a batch's cache, and the cache index just past its keys)."""
        t_q = queries.shape[2]
        queries = self._intervene([iv for iv in edits if iv.component == "query"], queries, on_input=False)
        new = []
        for name, array in (("key", keys), ("value", values)):
            tail = array[:, :, -t_q:]
            edited = self._intervene([iv for iv in edits if iv.component == name], tail, on_input=False)
            new.append(edited if edited is not tail else None)
        if all(e is None for e in new):
            return queries, keys, values
        if cache is not None:
            if type(cache) is KVCache:
                end, rows = cache.offset, slice(None)
            elif type(cache) is BatchKVCache and row is not None:
                end, rows = row[1], slice(row[0], row[0] + 1)
            else:
                raise EngineError(f"key and value interventions need a plain KV cache, not {type(cache).__name__}",
                                  "interventions")
            for name, edited in zip(("keys", "values"), new):
                if edited is not None:
                    getattr(cache, name)[rows, :, end - t_q:end, :] = edited
        keys, values = (a if e is None else (e if a.shape[2] == t_q else mx.concatenate([a[:, :, :-t_q], e], axis=2))
                        for a, e in zip((keys, values), new))
        return queries, keys, values


class BatchCapture:
    """The captures of the rows of one batched forward (rows without hooks or interventions have
    none here). Each request's interventions see and change its own row only, and its records
    hold its own row: `tokens[i]` real tokens of row i come first on the token axis (a prompt
    batch is right-padded), and `keys[i]` are the key columns that are its own (a decode
    batch's left padding and a prompt batch's right padding are masked out by the batch's
    mask and dropped from what is kept)."""

    def __init__(self, rows: list[tuple[int, Capture]], tokens: list[int], keys: list[slice]):
        self._rows = rows  # (row in the batch, that request's Capture)
        self._tokens, self._keys = tokens, keys  # per row of the batch
        modules, self._attn_layer = {}, {}
        for _, c in rows:
            modules.update((id(m), m) for m in c._modules)
            self._attn_layer.update(c._attn_layer)
        self._modules = list(modules.values())
        self._routers = {key for _, c in rows for table in (c._edits, c._taps) for key, items in table.items()
                         if any((t[0] if isinstance(t, tuple) else t).site == "router" for t in items)}
        self._seam_module = rows[0][1]._seam_module
        self._uses_seam = any(c.uses_seam for _, c in rows)
        self._seam_layer: int | None = None

    def installed(self):
        return _installed(self, self._modules, self._seam_module if self._uses_seam else None)

    def _on_module(self, module, cls: type, x, args, kwargs, x_name: str | None = None):
        key = id(module)
        rows = [(i, c) for i, c in self._rows if key in c._edits or key in c._taps]
        flat = key in self._routers and x.ndim == 2  # a router fed flattened tokens (olmoe): [B * T, d]
        x3 = x.reshape(len(self._tokens), -1, x.shape[-1]) if flat else x
        x3 = self._put(x3, 1, [(i, c._before(module, self._take(x3, i))) for i, c in rows if key in c._edits])
        x = x3.reshape(-1, x3.shape[-1]) if flat else x3

        def after(y):
            y_flat = key in self._routers and y.ndim == 2
            y3 = y.reshape(len(self._tokens), -1, y.shape[-1]) if y_flat else y
            done = [(i, c._after(module, self._take(x3, i), self._take(y3, i))) for i, c in rows]
            y3 = self._put(y3, 1, [(i, r) for (i, r), (_, c) in zip(done, rows) if key in c._edits])
            return y3.reshape(-1, y3.shape[-1]) if y_flat else y3

        return _call_module(self, module, cls, x, args, kwargs, x_name, self._attn_layer.get(key), after)

    def _take(self, x: mx.array, i: int) -> mx.array:
        return x[i:i + 1, :self._tokens[i]]

    def _put(self, x: mx.array, axis: int, rows: list[tuple[int, mx.array]], spans=None) -> mx.array:
        """`x` with rows replaced: row i's span on `axis` (its real tokens, or `spans[i]`) by the
        new values, the rest of the row (padding) kept."""
        if not rows:
            return x
        parts = [x[i:i + 1] for i in range(x.shape[0])]
        for i, new in rows:
            span = spans[i] if spans is not None else slice(0, self._tokens[i])
            row, n = parts[i], x.shape[axis]
            before = [row[(slice(None),) * axis + (slice(0, span.start),)]] if span.start else []
            after = [row[(slice(None),) * axis + (slice(span.stop, n),)]] if span.stop < n else []
            parts[i] = mx.concatenate([*before, new, *after], axis=axis) if before or after else new
        return mx.concatenate(parts, axis=0)

    def _seam(self, original):
        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, **kwargs):
            layer = self._seam_layer
            rows = [] if layer is None else \
                [(i, c) for i, c in self._rows if layer in c._sdpa_edits or layer in c._sdpa_taps]
            q_rows = {i: queries[i:i + 1, :, :self._tokens[i]] for i, _ in rows}
            k_rows = {i: keys[i:i + 1, :, self._keys[i]] for i, _ in rows}
            v_rows = {i: values[i:i + 1, :, self._keys[i]] for i, _ in rows}
            edited = [(i, c._seam_before(layer, q_rows[i], k_rows[i], v_rows[i], cache, row=(i, self._keys[i].stop)))
                      for i, c in rows if layer in c._sdpa_edits]
            if edited:
                queries = self._put(queries, 2, [(i, qkv[0]) for i, qkv in edited])
                keys = self._put(keys, 2, [(i, qkv[1]) for i, qkv in edited], self._keys)
                values = self._put(values, 2, [(i, qkv[2]) for i, qkv in edited], self._keys)
                for i, (q, k, v) in edited:
                    q_rows[i], k_rows[i], v_rows[i] = q, k, v
            out = original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
            changed = []
            for i, c in rows:
                row_mask = mask
                if isinstance(mask, mx.array):
                    row_mask = mask[i:i + 1] if mask.ndim == 4 and mask.shape[0] > 1 else mask
                    row_mask = row_mask[..., :self._tokens[i], self._keys[i]]
                o = c._seam_after(layer, q_rows[i], k_rows[i], v_rows[i], out[i:i + 1, :, :self._tokens[i]], scale,
                                  row_mask, kwargs.get("sinks"))
                if layer in c._sdpa_edits:
                    changed.append((i, o))
            return self._put(out, 2, changed)

        return scaled_dot_product_attention
