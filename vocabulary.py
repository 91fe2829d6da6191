"""The one vocabulary every layer speaks: components, positions, dtypes and layer names.

A client names a tensor with a layer name and a component. This module says what each
component is (where the engine takes it, its shape per token, which axis holds the tokens,
whether it has an input, how its growing key axis is padded) and how the three naming
schemes resolve: the model's own paths (`model.layers.5`, `model.h.5`), NeuroScope's GPT-2
style (`transformer.h.5`, `transformer.wte`, `transformer.ln_f`) and TransformerLens hook
names (`blocks.5.hook_resid_post`, `blocks.5.attn.hook_pattern`, `hook_embed`, ...).

The engine, the shared-memory schema, inline entries, the bridge's conversion, the Smalltalk
generator and `GET /v1/activations/points` all derive from it. It imports nothing heavy (no
MLX, no numpy), so clients can read it too. Adding a component means one entry in
`COMPONENTS` (plus its capture code in the engine).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Component:
    """What one kind of captured tensor is.

    `sizes` names the per-token axes in stored (token-major) order; each is a model dimension
    (`d_model`, `d_head`, `d_mlp`, `n_heads`, `n_kv_heads`, `n_experts`) or `key`, the key axis of attention, which
    grows with the sequence. The engine's per-step arrays put the tokens on `token_axis`:
    0 for vectors ([T, d_model]), 1 for per-head tensors ([heads, T, ...]).
    """

    name: str
    site: str  # where the engine takes it: embed | block | attn | mlp | ln1 | ln2 | lnf | sdpa | mlp_post | router
    sizes: tuple[str, ...]
    token_axis: int
    has_input: bool  # a module input exists (capture_input applies)
    key_pad: float | None = None  # the key axis' pad where a row saw fewer keys (exact, see below)
    description: str = ""

    @property
    def dim_names(self) -> tuple[str, ...]:
        """Per-token axis names as stored: `head` for either head count."""
        return tuple("head" if s in ("n_heads", "n_kv_heads") else s for s in self.sizes)

    @property
    def per_head(self) -> bool:
        return self.token_axis == 1


# The API's order (what clients list, e.g. GET /v1/activations/points); docs/activations.md describes each.
# Key pads are exact: the causal mask puts -inf on keys a row never saw (scores), and softmax
# gives them probability 0 (pattern).
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("residual", "block", ("d_model",), 0, True,
              description="block output, the residual stream after the layer (input: before it)"),
    Component("attention", "attn", ("d_model",), 0, True,
              description="attention module output, after the output projection"),
    Component("mlp", "mlp", ("d_model",), 0, True, description="MLP output"),
    Component("embedding", "embed", ("d_model",), 0, False,
              description="token embedding, as the embedding module returns it: before any scale the model "
                          "applies (Gemma's sqrt(d_model), MiniCPM's scale_emb, Granite's embedding_multiplier)"),
    Component("layernorm", "ln1", ("d_model",), 0, True,
              description="pre-attention norm output (ln2 / ln_final via TransformerLens names)"),
    Component("attention_scores", "sdpa", ("n_heads", "key"), 1, False, key_pad=-math.inf,
              description="scaled pre-softmax scores with the mask applied"),
    Component("attention_pattern", "sdpa", ("n_heads", "key"), 1, False, key_pad=0.0,
              description="softmax of the scores"),
    Component("key", "sdpa", ("n_kv_heads", "d_head"), 1, False, description="keys after RoPE, per KV head"),
    Component("query", "sdpa", ("n_heads", "d_head"), 1, False, description="queries after RoPE, per head"),
    Component("value", "sdpa", ("n_kv_heads", "d_head"), 1, False, description="values, per KV head"),
    Component("head_output", "sdpa", ("n_heads", "d_head"), 1, False,
              description="each head's attention output (pattern @ values), before the output projection"),
    Component("mlp_activation", "mlp_post", ("d_mlp",), 0, False,
              description="the MLP's hidden activation (after the nonlinearity and the gate): its neurons, "
                          "what the down projection receives"),
    Component("router", "router", ("n_experts",), 0, False,
              description="mixture-of-experts layers only: the router's logits per expert, what its linear gate "
                          "outputs (before the softmax or sigmoid). The chosen experts are the num_experts_per_tok "
                          "largest routing scores computed from them (the same ranking as the logits, unless the "
                          "model adds a per-expert selection bias, e.g. MiniMax-M2's e_score_correction_bias); "
                          "interventions change the logits before the choice"),
)}
COMPONENT_NAMES = tuple(COMPONENTS)
ATTENTION_INTERNALS = tuple(c.name for c in COMPONENTS.values() if c.site == "sdpa")
KEY_PADDED = tuple(c.name for c in COMPONENTS.values() if c.key_pad is not None)

# Interventions: what may change a tensor, and which tokens of the sequence it applies to.
# Scores and patterns are not interventable: the fused attention kernel never materialises
# them, so changing a copy would change nothing (use query, key, value or head_output).
INTERVENTION_OPS = ("zero", "scale", "add", "set", "project_out", "clamp", "patch")
INTERVENTION_POSITIONS = ("all", "prompt", "generated")
NOT_INTERVENABLE = KEY_PADDED

POSITIONS = ("all", "last", "prompt", "generated")
DTYPES = ("float32", "float16", "bfloat16")
ENCODINGS = ("json", "base64")
TRANSPORTS = ("inline", "shm")

# NeuroScope's names for the layers that are not decoder blocks.
EMBEDDING_LAYER = "transformer.wte"
FINAL_NORM_LAYER = "transformer.ln_f"

# A sub-module named after a layer (`model.layers.5.mlp`) must agree with the component.
SUBMODULES = {
    "self_attn": "attn", "attn": "attn", "mlp": "mlp",
    "input_layernorm": "ln1", "ln_1": "ln1", "ln1": "ln1",
    "post_attention_layernorm": "ln2", "ln_2": "ln2", "ln2": "ln2",
}
_SITE_COMPONENTS = {
    "attn": ("attention",) + ATTENTION_INTERNALS, "mlp": ("mlp", "mlp_activation", "router"), "ln1": ("layernorm",),
    "ln2": ("layernorm",),
}
# TransformerLens hook name (after `blocks.N.`) -> (site, component, is_input)
TL_BLOCK_HOOKS = {
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
    "attn.hook_z": ("sdpa", "head_output", False),
    "mlp.hook_post": ("mlp_post", "mlp_activation", False),
    "mlp.hook_router": ("router", "router", False),
    "ln1.hook_normalized": ("ln1", "layernorm", False),
    "ln2.hook_normalized": ("ln2", "layernorm", False),
}
TL_GLOBAL_HOOKS = {
    "hook_embed": ("embed", "embedding", False),
    "ln_final.hook_normalized": ("lnf", "layernorm", False),
}
EMBED_NAMES = {EMBEDDING_LAYER, "model.embed_tokens", "model.wte", "embed_tokens", "wte", "embed", "embedding"}
FINAL_NORM_NAMES = {FINAL_NORM_LAYER, "model.norm", "model.ln_f", "ln_f", "norm", "ln_final"}
LAYER_NAME = re.compile(r"^(?:transformer\.h|model\.layers|model\.h|layers|h|blocks)\.(\d+)(?:\.(.+))?$")
# Every name the grammar can accept (for schemas; which layer indices exist depends on the model).
LAYER_NAME_PATTERN = "|".join([LAYER_NAME.pattern] + [
    "^" + re.escape(n) + "$" for n in sorted({*TL_GLOBAL_HOOKS, *EMBED_NAMES, *FINAL_NORM_NAMES})])

NAMES_HELP = (
    "layer names: model.layers.N or transformer.h.N (optionally .self_attn/.attn, .mlp, .input_layernorm/.ln_1, "
    ".post_attention_layernorm/.ln_2), transformer.wte / model.embed_tokens, transformer.ln_f / model.norm, "
    "or TransformerLens names blocks.N." + "|".join(TL_BLOCK_HOOKS) + ", " + ", ".join(TL_GLOBAL_HOOKS)
)


class VocabularyError(ValueError):
    """A name or component that does not resolve; `field` is `layer_name` or `component`."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Site:
    """Where a named tensor is taken. `is_input` is None when the hook's flags decide."""

    site: str
    layer: int | None
    component: str
    is_input: bool | None


def resolve_name(layer_name: str, component: str | None, n_layers: int) -> Site:
    """Resolve a client's (layer_name, component) on a model with `n_layers` decoder layers."""
    if component is not None and component not in COMPONENTS:
        raise VocabularyError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}",
                              "component")
    name = layer_name.strip()
    if name in TL_GLOBAL_HOOKS:
        site, implied, is_input = TL_GLOBAL_HOOKS[name]
        return Site(site, None, _agree(implied, component, layer_name), is_input)
    if name in EMBED_NAMES:
        return Site("embed", None, _agree("embedding", component, layer_name), None)
    if name in FINAL_NORM_NAMES:
        return Site("lnf", None, _agree("layernorm", component, layer_name), None)
    m = LAYER_NAME.match(name)
    if not m:
        raise VocabularyError(f"unknown layer name {layer_name!r}; valid {NAMES_HELP}", "layer_name")
    layer = int(m.group(1))
    if not 0 <= layer < n_layers:
        raise VocabularyError(
            f"unknown layer {layer_name!r}: the model has {n_layers} layers, numbered 0 to {n_layers - 1}",
            "layer_name")
    sub = m.group(2)
    if name.startswith("blocks.") and sub in TL_BLOCK_HOOKS:
        site, implied, is_input = TL_BLOCK_HOOKS[sub]
        return Site(site, layer, _agree(implied, component, layer_name), is_input)
    if sub is not None and sub not in SUBMODULES:  # also a misspelt TransformerLens hook name
        raise VocabularyError(f"unknown sub-module {sub!r} in {layer_name!r}; valid {NAMES_HELP}", "layer_name")
    if component is None:
        raise VocabularyError(f"hook on {layer_name!r} needs a 'component': one of {', '.join(COMPONENTS)}",
                              "component")
    if component == "embedding":
        return Site("embed", None, component, None)  # the layer name is ignored for embeddings
    if sub is None:
        return Site(COMPONENTS[component].site, layer, component, None)
    site = SUBMODULES[sub]
    if component not in _SITE_COMPONENTS[site]:
        raise VocabularyError(
            f"component {component!r} is not part of {layer_name!r}; there: {', '.join(_SITE_COMPONENTS[site])}",
            "component")
    # The sub-module decides which norm; every other component has one site.
    return Site(site if component == "layernorm" else COMPONENTS[component].site, layer, component, None)


def _agree(implied: str, requested: str | None, layer_name: str) -> str:
    if requested not in (None, implied):
        raise VocabularyError(
            f"{layer_name!r} names a {implied!r} tensor but the hook asks for component {requested!r}", "component")
    return implied


def intervention_refusal(site: Site, named_by_component: bool = True) -> tuple[str, str] | None:
    """Why a resolved tensor cannot be intervened on, and the field at fault (`component`, or
    `layer_name` when the name alone chose it); None if it can."""
    if site.component in NOT_INTERVENABLE:
        return (f"{site.component} cannot be intervened on: the fused attention kernel never materialises it, so a "
                "changed copy would change nothing; intervene on query, key, value or head_output instead",
                "component" if named_by_component else "layer_name")
    if site.site == "ln2" and site.is_input:
        return ("hook_resid_mid is what the MLP's norm receives: changing it would not change the residual stream; "
                f"intervene on blocks.{site.layer}.hook_attn_out or blocks.{site.layer + 1}.hook_resid_pre instead",
                "layer_name")
    return None


def per_token_shape(component: str, dims: Mapping[str, int]) -> list[int]:
    """Stored (token-major) shape of one token's tensor; the key axis is -1 (the sequence so far).
    `dims` holds the model's d_model, d_head, d_mlp, n_heads, n_kv_heads and n_experts."""
    return [-1 if s == "key" else int(dims[s]) for s in COMPONENTS[component].sizes]


def neuroscope_layer_name(layer: int | None, component: str) -> str:
    """NeuroScope's GPT-2 style name of a layer index (None: embedding or final norm)."""
    if layer is not None:
        return f"transformer.h.{layer}"
    return EMBEDDING_LAYER if component == "embedding" else FINAL_NORM_LAYER


def hook_point_names(n_layers: int) -> list[tuple[str, Site]]:
    """Every capturable tensor of a model, by its TransformerLens name, in model order."""
    points = [("hook_embed", Site("embed", None, "embedding", False))]
    for i in range(n_layers):
        for tl, (site, comp, is_input) in TL_BLOCK_HOOKS.items():
            points.append((f"blocks.{i}.{tl}", Site(site, i, comp, is_input)))
    points.append(("ln_final.hook_normalized", Site("lnf", None, "layernorm", False)))
    return points
