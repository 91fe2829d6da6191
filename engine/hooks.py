"""Hook specs resolved on a loaded model, the listing of every hook point, and capture sizes.

The names, components and their shapes are the vocabulary's (`vocabulary.py`); this module
applies them to one model (its layer count, its module paths, its dimensions) and adds the
checks that need a whole request: one id per tensor, something to capture, an input only
where one exists. Nothing falls back silently: an unknown name is an error that lists what
exists, and names the argument at fault (`hooks[2].layer_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import vocabulary
from engine.errors import InvalidArgument, UnknownHook
from engine.model import LoadedModel
from engine.params import CaptureOptions, HookSpec, parse_list


@dataclass(frozen=True)
class HookTarget:
    """A resolved tensor: which site on which layer, and which direction."""

    hook_id: str
    layer_name: str  # as the client wrote it
    component: str
    site: str  # embed | block | attn | mlp | ln1 | ln2 | lnf | sdpa | mlp_post | router
    layer: int | None
    is_input: bool


def hook_specs(values: Iterable[HookSpec | dict], arg: str = "hooks") -> list[HookSpec]:
    """HookSpecs from HookSpecs or plain dicts (validated, errors name `hooks[i].field`)."""
    return parse_list(HookSpec, values, arg, "layer_name, component, ...")


def resolve_hooks(lm: LoadedModel, specs: list[HookSpec], arg: str = "hooks") -> list[HookTarget]:
    """Turn hook specs into targets, in order; a hook's output comes before its input (so that
    `shm.format.column_names` names them `<id>` and `<id>:input`), and both share its id."""
    targets: list[HookTarget] = []
    seen: set[tuple[str, bool]] = set()
    for i, spec in enumerate(specs):
        where = f"{arg}[{i}]"
        for t in resolve_hook(lm, spec, where):
            if (t.hook_id, t.is_input) in seen:
                raise InvalidArgument(f"{where}: hook_id {t.hook_id!r} is used twice; give each hook its own id",
                                      f"{where}.hook_id")
            seen.add((t.hook_id, t.is_input))
            targets.append(t)
    return targets


def resolve_hook(lm: LoadedModel, spec: HookSpec, where: str | None = None) -> list[HookTarget]:
    """One spec's targets (one per direction). Errors name `<where>.<field>`, or the bare field
    when `where` is None (a single hook given as keyword arguments)."""

    def arg(field: str | None) -> str | None:
        return f"{where}.{field}" if where and field else (field or where)

    prefix = f"{where}: " if where else ""
    try:
        site = resolve_site(lm, spec.layer_name, spec.component)
    except vocabulary.VocabularyError as exc:
        # A missing component is a missing value; everything else names something that does not exist.
        kind = InvalidArgument if exc.field == "component" and spec.component is None else UnknownHook
        raise kind(prefix + exc.message, arg(exc.field)) from None
    # A TransformerLens name is already unique; otherwise the id says layer and component.
    default_id = spec.layer_name if site.is_input is not None else f"{spec.layer_name}.{site.component}"
    hook_id = spec.hook_id or default_id
    if site.is_input is not None:
        if spec.capture_input:
            raise InvalidArgument(f"{prefix}{spec.layer_name!r} already names one tensor; capture_input does not "
                                  "apply", arg("capture_input"))
        directions = [site.is_input]
    else:
        directions = [d for d, wanted in ((False, spec.capture_output), (True, spec.capture_input)) if wanted]
        if not directions:
            raise InvalidArgument(f"{prefix or 'the hook '}captures nothing: set capture_output or capture_input",
                                  arg("capture_output"))
        if spec.capture_input and not vocabulary.COMPONENTS[site.component].has_input:
            raise InvalidArgument(f"{prefix}component {site.component!r} has no input tensor to capture; use "
                                  "capture_output", arg("capture_input"))
    return [HookTarget(hook_id, spec.layer_name, site.component, site.site, site.layer, d) for d in directions]


def resolve_site(lm: LoadedModel, layer_name: str, component: str | None) -> vocabulary.Site:
    """The vocabulary's resolution, refused (VocabularyError) where this model has no such part:
    a model without a pre-MLP norm has no `ln2`, an expert MoE block no single neuron layer."""
    site = vocabulary.resolve_name(layer_name, component, lm.info.n_layers)
    if not lm.arch.has(site.site, site.layer):
        why = MISSING["attn" if site.site == "sdpa" and lm.arch.attn is None else site.site]
        raise vocabulary.VocabularyError(
            f"{lm.info.architecture} models have no {site.component} at {layer_name!r} "
            f"({why}); GET /v1/activations/points lists what this model has",
            "component" if component is not None else "layer_name")
    why = lm.arch.lacks(site.component)
    if why:
        raise vocabulary.VocabularyError(
            f"{lm.info.architecture} models have no exact {site.component} at {layer_name!r} ({why}); "
            "GET /v1/activations/points lists what this model has",
            "component" if component is not None else "layer_name")
    return site


# Why a site can be missing, for the error above.
MISSING = {
    "attn": "their blocks have several attention modules, not one",
    "ln1": "their blocks have no single norm in front of attention",
    "ln2": "their blocks have no single norm in front of the MLP",
    "mlp_post": "their MLP has no single output projection (e.g. a mixture of experts)",
    "router": "no mixture-of-experts block there with a linear router (dense MLP, or a router that computes its "
              "logits inside a selection module)",
    "sdpa": "their attention does not go through mlx-lm's scaled_dot_product_attention",
}


def per_token_shape(lm: LoadedModel, component: str) -> list[int]:
    """Stored (token-major) shape of one token's tensor on this model; the key axis is -1."""
    return vocabulary.per_token_shape(component, lm.info.dims)


def module_path(lm: LoadedModel, t: HookTarget | vocabulary.Site) -> str:
    """The model's own dotted path of the module a target is taken from."""
    return lm.arch.module_path("attn" if t.site == "sdpa" else t.site, t.layer)


def hook_points(lm: LoadedModel) -> list[dict[str, Any]]:
    """Every tensor a client can capture on the loaded model, by its TransformerLens name, with
    its other names, its shape per token and whether interventions may change it."""
    points = []
    for name, site in vocabulary.hook_point_names(lm.info.n_layers):
        if not lm.arch.has(site.site, site.layer) or lm.arch.lacks(site.component):
            continue
        own = lm.arch.module_path("block" if site.layer is not None else site.site, site.layer)
        points.append({
            "name": name,
            "module_path": module_path(lm, site),
            "aliases": [vocabulary.neuroscope_layer_name(site.layer, site.component), own],
            "layer": site.layer,
            "layer_index": site.layer,
            "component": site.component,
            "is_input": site.is_input,
            "shape_per_token": per_token_shape(lm, site.component),
            "dtype": "float32",
            "interventable": vocabulary.intervention_refusal(site) is None,
        })
    return points


def estimate_bytes(lm: LoadedModel, targets: list[HookTarget], prompt_len: int, max_tokens: int,
                   options: CaptureOptions) -> int:
    """Upper bound of a capture's size: every step of a generation that runs to max_tokens (the
    prefill of `prompt_len` tokens, then one step per generated token)."""
    itemsize = 4 if options.dtype == "float32" else 2
    p, m = prompt_len, max_tokens
    rows_prefill = 0 if options.positions == "generated" else (1 if options.positions == "last" else p)
    rows_decode = 0 if options.positions == "prompt" else m  # one token per decode step
    # Keys seen: the prefill's rows see up to p keys (row i sees i + 1; stored padded to p), and
    # decode step k sees p + k + 1.
    keys_prefill = rows_prefill * p
    keys_decode = 0 if options.positions == "prompt" else m * p + m * (m + 1) // 2
    total = 0
    for t in targets:
        shape = per_token_shape(lm, t.component)
        elems = 1
        for d in shape:
            elems *= abs(d)
        if shape[-1] == -1:  # scores / pattern: [heads, q, keys so far]
            total += elems * (keys_prefill + keys_decode) * itemsize
        else:
            total += elems * (rows_prefill + rows_decode) * itemsize
    return total
