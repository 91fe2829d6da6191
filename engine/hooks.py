"""Hook requests: parsing, name resolution and the listing of every hook point.

A client names a tensor with a layer name and a component. Three vocabularies resolve:
the model's own module paths (`model.layers.5`, `model.h.5`), NeuroScope's GPT-2 style
(`transformer.h.5`, `transformer.wte`, `transformer.ln_f`) and TransformerLens hook names
(`blocks.5.hook_resid_post`, `blocks.5.attn.hook_pattern`, `hook_embed`, ...). Each resolves
to a *site* (the module or seam where the tensor is taken) on a layer, and a direction.
Nothing falls back silently: an unknown name is an error that lists what exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequest, UnknownHook
from engine.model import LoadedModel

COMPONENTS = (
    "residual", "attention", "mlp", "embedding", "layernorm",
    "attention_scores", "attention_pattern", "key", "query", "value",
)
ATTENTION_INTERNALS = ("query", "key", "value", "attention_scores", "attention_pattern")
POSITIONS = ("all", "last", "prompt", "generated")
DTYPES = ("float32", "float16", "bfloat16")

# Sites: where a tensor is taken. "sdpa" is the attention seam (post-RoPE q/k, cache-joined k/v).
_COMPONENT_SITE = {
    "embedding": "embed", "residual": "block", "attention": "attn", "mlp": "mlp", "layernorm": "ln1",
    **{c: "sdpa" for c in ATTENTION_INTERNALS},
}
# A sub-module named after a layer (`model.layers.5.mlp`) must agree with the component.
_SUBMODULES = {
    "self_attn": "attn", "attn": "attn", "mlp": "mlp",
    "input_layernorm": "ln1", "ln_1": "ln1", "ln1": "ln1",
    "post_attention_layernorm": "ln2", "ln_2": "ln2", "ln2": "ln2",
}
_SUBMODULE_COMPONENTS = {
    "attn": ("attention",) + ATTENTION_INTERNALS, "mlp": ("mlp",), "ln1": ("layernorm",), "ln2": ("layernorm",),
}
# TransformerLens hook name (after `blocks.N.`) -> (site, component, is_input)
_TL_BLOCK_HOOKS = {
    "hook_resid_pre": ("block", "residual", True),
    "hook_resid_post": ("block", "residual", False),
    "hook_resid_mid": ("ln2", "residual", True),
    "hook_attn_out": ("attn", "attention", False),
    "hook_mlp_out": ("mlp", "mlp", False),
    "hook_attn_in": ("attn", "attention", True),
    "hook_mlp_in": ("mlp", "mlp", True),
    "attn.hook_q": ("sdpa", "query", False),
    "attn.hook_k": ("sdpa", "key", False),
    "attn.hook_v": ("sdpa", "value", False),
    "attn.hook_attn_scores": ("sdpa", "attention_scores", False),
    "attn.hook_pattern": ("sdpa", "attention_pattern", False),
    "ln1.hook_normalized": ("ln1", "layernorm", False),
    "ln2.hook_normalized": ("ln2", "layernorm", False),
}
_TL_GLOBAL_HOOKS = {
    "hook_embed": ("embed", "embedding", False),
    "ln_final.hook_normalized": ("lnf", "layernorm", False),
}
_EMBED_NAMES = {"transformer.wte", "model.embed_tokens", "model.wte", "embed_tokens", "wte", "embed", "embedding"}
_FINAL_NORM_NAMES = {"transformer.ln_f", "model.norm", "model.ln_f", "ln_f", "norm", "ln_final"}
_LAYER = re.compile(r"^(?:transformer\.h|model\.layers|model\.h|layers|h|blocks)\.(\d+)(?:\.(.+))?$")

NAMES_HELP = (
    "layer names: model.layers.N or transformer.h.N (optionally .self_attn/.attn, .mlp, .input_layernorm/.ln_1, "
    ".post_attention_layernorm/.ln_2), transformer.wte / model.embed_tokens, transformer.ln_f / model.norm, "
    "or TransformerLens names blocks.N.hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|"
    "attn.hook_q|attn.hook_k|attn.hook_v|attn.hook_attn_scores|attn.hook_pattern|ln1.hook_normalized|"
    "ln2.hook_normalized, hook_embed, ln_final.hook_normalized"
)


@dataclass(frozen=True)
class HookTarget:
    """A resolved tensor: which site on which layer, and which direction."""

    hook_id: str
    layer_name: str  # as the client wrote it
    component: str
    site: str  # embed | block | attn | mlp | ln1 | ln2 | lnf | sdpa
    layer: int | None
    is_input: bool


@dataclass(frozen=True)
class CaptureOptions:
    positions: str = "all"  # all | last (last token of each step) | prompt | generated
    dtype: str = "float32"

    @classmethod
    def parse(cls, positions: Any = "all", dtype: Any = "float32") -> "CaptureOptions":
        positions = "all" if positions is None else positions
        dtype = "float32" if dtype is None else dtype
        if positions not in POSITIONS:
            raise InvalidRequest(f"'activation_positions' must be one of {', '.join(POSITIONS)} (got {positions!r})",
                                 "activation_positions")
        if dtype not in DTYPES:
            raise InvalidRequest(f"'activation_dtype' must be one of {', '.join(DTYPES)} (got {dtype!r})",
                                 "activation_dtype")
        return cls(positions, dtype)


def _layer_index(text: str, n_layers: int, layer_name: str) -> int:
    i = int(text)
    if not 0 <= i < n_layers:
        raise UnknownHook(
            f"unknown layer {layer_name!r}: the model has {n_layers} layers, numbered 0 to {n_layers - 1}", "layer_name"
        )
    return i


def _resolve_name(layer_name: str, component: str | None, n_layers: int) -> tuple[str, int | None, str, bool | None]:
    """-> (site, layer, component, is_input or None when the request's flags decide)."""
    name = layer_name.strip()
    if name in _TL_GLOBAL_HOOKS:
        site, comp, is_input = _TL_GLOBAL_HOOKS[name]
        return site, None, _agree(comp, component, layer_name), is_input
    if name in _EMBED_NAMES:
        return "embed", None, _agree("embedding", component, layer_name), None
    if name in _FINAL_NORM_NAMES:
        return "lnf", None, _agree("layernorm", component, layer_name), None
    m = _LAYER.match(name)
    if not m:
        raise UnknownHook(f"unknown layer name {layer_name!r}; valid {NAMES_HELP}", "layer_name")
    layer = _layer_index(m.group(1), n_layers, layer_name)
    sub = m.group(2)
    if name.startswith("blocks.") and sub in _TL_BLOCK_HOOKS:
        site, comp, is_input = _TL_BLOCK_HOOKS[sub]
        return site, layer, _agree(comp, component, layer_name), is_input
    if sub is not None and sub not in _SUBMODULES:  # also a misspelt TransformerLens hook name
        raise UnknownHook(f"unknown sub-module {sub!r} in {layer_name!r}; valid {NAMES_HELP}", "layer_name")
    if component is None:
        raise InvalidRequest(f"hook on {layer_name!r} needs a 'component': one of {', '.join(COMPONENTS)}", "component")
    if component == "embedding":
        return "embed", None, component, None  # the layer name is ignored for embeddings (DESIGN 3)
    if sub is None:
        return _COMPONENT_SITE[component], layer, component, None
    site = _SUBMODULES[sub]
    if component not in _SUBMODULE_COMPONENTS[site]:
        raise UnknownHook(
            f"component {component!r} is not part of {layer_name!r}; there: {', '.join(_SUBMODULE_COMPONENTS[site])}",
            "component",
        )
    return ("sdpa" if component in ATTENTION_INTERNALS else site), layer, component, None


def _agree(implied: str, requested: str | None, layer_name: str) -> str:
    if requested not in (None, implied):
        raise UnknownHook(
            f"{layer_name!r} names a {implied!r} tensor but the hook asks for component {requested!r}", "component"
        )
    return implied


def resolve_hooks(lm: LoadedModel, specs: Any) -> list[HookTarget]:
    """Turn the request's `activation_hooks` into targets; input and output of one hook share its id."""
    if not isinstance(specs, list):
        raise InvalidRequest("'activation_hooks' must be a list of hook objects", "activation_hooks")
    targets: list[HookTarget] = []
    seen: set[tuple[str, bool]] = set()
    for i, spec in enumerate(specs):
        param = f"activation_hooks[{i}]"
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{param} must be an object with 'layer_name' and 'component'", param)
        layer_name, component = spec.get("layer_name"), spec.get("component")
        if not isinstance(layer_name, str) or not layer_name:
            raise InvalidRequest(f"{param}.layer_name must be a non-empty string", f"{param}.layer_name")
        if component is not None and component not in COMPONENTS:
            raise UnknownHook(
                f"unknown component {component!r} in {param}; valid components: {', '.join(COMPONENTS)}",
                f"{param}.component",
            )
        cap_in, cap_out = spec.get("capture_input", False), spec.get("capture_output", True)
        if not isinstance(cap_in, bool) or not isinstance(cap_out, bool):
            raise InvalidRequest(f"{param}.capture_input and capture_output must be booleans", param)
        try:
            site, layer, component, fixed = _resolve_name(layer_name, component, lm.info.n_layers)
        except (UnknownHook, InvalidRequest) as exc:
            exc.message = f"{param}: {exc.message}"
            exc.args = (exc.message,)
            exc.param = f"{param}.{exc.param}" if exc.param else param
            raise
        # A TransformerLens name is already unique; otherwise the id says layer and component.
        default_id = layer_name if fixed is not None else f"{layer_name}.{component}"
        hook_id = spec.get("hook_id") or default_id
        if not isinstance(hook_id, str):
            raise InvalidRequest(f"{param}.hook_id must be a string", f"{param}.hook_id")
        if fixed is not None:
            if cap_in:
                raise InvalidRequest(
                    f"{param}: {layer_name!r} already names one tensor; capture_input does not apply", param
                )
            directions = [fixed]
        else:
            directions = [d for d, wanted in ((True, cap_in), (False, cap_out)) if wanted]
            if not directions:
                raise InvalidRequest(f"{param} captures nothing: set capture_output or capture_input", param)
        for is_input in directions:
            if is_input and site in ("sdpa", "embed"):
                raise InvalidRequest(
                    f"{param}: component {component!r} has no input tensor to capture; use capture_output", param
                )
            if (hook_id, is_input) in seen:
                raise InvalidRequest(f"{param}: hook_id {hook_id!r} is used twice; give each hook its own id", param)
            seen.add((hook_id, is_input))
            targets.append(HookTarget(hook_id, layer_name, component, site, layer, is_input))
    return targets


def per_token_shape(lm: LoadedModel, t: HookTarget) -> list[int]:
    """Shape of one token's slice (for scores/patterns the key axis is the sequence so far: -1)."""
    info = lm.info
    if t.component in ("query", "attention_scores", "attention_pattern"):
        return [info.n_heads, info.d_head] if t.component == "query" else [info.n_heads, -1]
    if t.component in ("key", "value"):
        return [info.n_kv_heads, info.d_head]
    return [info.d_model]


def module_path(lm: LoadedModel, t: HookTarget) -> str:
    arch = lm.arch
    if t.site == "embed":
        return arch.module_path("embed")
    if t.site == "lnf":
        return arch.module_path("final_norm")
    return arch.module_path("attn" if t.site == "sdpa" else t.site, t.layer)


def hook_points(lm: LoadedModel) -> list[dict]:
    """Every tensor a client can capture on the loaded model, with its names and shape per token."""
    n = lm.info.n_layers
    points = [
        _point(lm, "hook_embed", ["transformer.wte", lm.arch.module_path("embed")], "embedding", "embed", None, False)
    ]
    for i in range(n):
        for tl, (site, comp, is_input) in _TL_BLOCK_HOOKS.items():
            aliases = [f"transformer.h.{i}", f"{lm.arch.module_path('block', i)}"]
            points.append(_point(lm, f"blocks.{i}.{tl}", aliases, comp, site, i, is_input))
    points.append(
        _point(lm, "ln_final.hook_normalized", ["transformer.ln_f", lm.arch.module_path("final_norm")],
               "layernorm", "lnf", None, False)
    )
    return points


def _point(lm, tl_name, aliases, component, site, layer, is_input) -> dict:
    t = HookTarget(tl_name, tl_name, component, site, layer, is_input)
    return {
        "name": tl_name,
        "module_path": module_path(lm, t),
        "aliases": aliases,
        "layer": layer,
        "component": component,
        "is_input": is_input,
        "shape_per_token": per_token_shape(lm, t),
        "dtype": "float32",
    }


def estimate_bytes(lm: LoadedModel, targets: list[HookTarget], prompt_len: int, max_tokens: int,
                   options: CaptureOptions) -> int:
    """Upper bound of a capture's size: every step of a generation that runs to max_tokens."""
    itemsize = 4 if options.dtype == "float32" else 2
    steps = [(0, prompt_len)] + [(prompt_len + k, 1) for k in range(max_tokens)]  # (start, n_tokens)
    if options.positions == "prompt":
        steps = steps[:1]
    elif options.positions == "generated":
        steps = steps[1:]
    total = 0
    for t in targets:
        shape = per_token_shape(lm, t)
        for start, n_tok in steps:
            q = 1 if options.positions == "last" else n_tok
            if shape[-1] == -1:  # scores / pattern: [heads, q, keys so far]
                total += shape[0] * q * (start + n_tok) * itemsize
            else:
                elems = 1
                for d in shape:
                    elems *= d
                total += q * elems * itemsize
    return total
