"""Where an mlx-lm model keeps its parts, found from its module tree.

Capture and interventions work on module instances (the embedding, the decoder blocks, their
attention, MLP, norms and output projections) and on the attention seam: the
`scaled_dot_product_attention` that a model file imports from mlx-lm's base, which receives
post-RoPE queries and keys. mlx-lm names modules as the Hugging Face checkpoints do, so a few
candidate names per part find them in almost every model file; `NOTES` records the models
where a name means something else (a post-norm where other models keep the pre-MLP norm) or
a part is nested (dbrx's `norm_attn_norm.attn`: a dotted path). Only modules are parts.
A part a model does not have is None: its components are absent from the hook points and
refused by name, never substituted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

# Each part's attribute names, most common first. `ln2` is the norm in front of the MLP.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "inner": ("model", "transformer", "gpt_neox", "backbone"),
    "layers": ("layers", "h", "blocks"),
    "embed": ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings"),
    "final_norm": ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm"),
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe"),
    "ln1": ("input_layernorm", "ln_1", "ln1", "attention_norm", "norm1"),
    "ln2": ("post_attention_layernorm", "ln_2", "ln2", "ffn_norm", "norm2"),
    "attn_out": ("o_proj", "c_proj", "dense", "out_proj", "wo"),
    "mlp_out": ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out"),
    "router": ("gate", "router"),  # inside a mixture-of-experts mlp: the linear giving the router logits
}
# Model types whose parts differ from what their names suggest.
_SANDWICH = {"ln2": "pre_feedforward_layernorm"}  # post_attention_layernorm normalises the attention's output
NOTES: dict[str, dict[str, str | None]] = {
    "gemma2": _SANDWICH, "gemma3": _SANDWICH, "gemma3_text": _SANDWICH, "gemma4": _SANDWICH, "gemma4_text": _SANDWICH,
    "olmo2": {"ln1": None, "ln2": None},  # post-norms only: the blocks take the raw residual stream
    "olmo3": {"ln1": None, "ln2": None},
    # Attention and its two norms live in a wrapper (norm_1, attn, norm_2) that the block calls.
    "dbrx": {"attn": "norm_attn_norm.attn", "ln1": "norm_attn_norm.norm_1", "ln2": "norm_attn_norm.norm_2"},
}
# Model arguments, by their names across model files.
ARGS = {
    "d_model": ("hidden_size", "n_embd", "d_model", "dim", "model_dim"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "context": ("max_position_embeddings", "n_positions", "max_seq_len", "context_length", "seq_length"),
}


@dataclass(frozen=True)
class Architecture:
    """The attribute name of each part (None: the model has none) and whether its attention
    goes through the seam."""

    name: str
    inner: str
    layers: str
    embed: str
    final_norm: str | None
    attn: str | None  # None: a block has several attentions (longcat_flash), no one module
    mlp: str
    ln1: str | None
    ln2: str | None
    attn_out: str | None  # inside attn: its input is each head's output (head_output)
    mlp_out: str | None  # inside mlp: its input is the neurons (mlp_activation); None if a block has experts
    seam: str | None  # the Python module whose scaled_dot_product_attention the attention calls (query ...)
    # Seam components this model's attention does not give exactly, with why (see _absent).
    absent: tuple[tuple[str, str], ...] = ()
    router: str | None = None  # inside mlp, on the layers in router_layers (the others' MLP is dense)
    router_layers: tuple[int, ...] = ()

    def _inner(self, model):
        return getattr(model, self.inner)

    def blocks(self, model) -> list:
        return getattr(self._inner(model), self.layers)

    def embedding(self, model):
        return getattr(self._inner(model), self.embed)

    def norm(self, model):
        return getattr(self._inner(model), self.final_norm)

    # Sites (vocabulary.Component.site) -> the attribute path inside a block; None: not in this model.
    def site_path(self, site: str) -> str | None:
        return {
            "block": "", "attn": self.attn, "mlp": self.mlp, "ln1": self.ln1, "ln2": self.ln2,
            "sdpa": self.attn if self.seam else None,
            "mlp_post": f"{self.mlp}.{self.mlp_out}" if self.mlp_out else None,
            "router": f"{self.mlp}.{self.router}" if self.router else None,
        }[site]

    def lacks(self, component: str) -> str | None:
        """Why this model has no `component` although it has its site; None when it has it."""
        return dict(self.absent).get(component)

    def has(self, site: str, layer: int | None = None) -> bool:
        """Whether the model has the site (on `layer`, where given: only MoE layers have a router)."""
        if site == "router" and layer is not None:
            return self.router is not None and layer in self.router_layers
        if site in ("embed", "lnf"):
            return site == "embed" or self.final_norm is not None
        return self.site_path(site) is not None

    def module(self, model, site: str, layer: int | None):
        """The module a site's tensor is taken from."""
        if site == "embed":
            return self.embedding(model)
        if site == "lnf":
            return self.norm(model)
        module = self.blocks(model)[layer]
        for attr in filter(None, self.site_path(site).split(".")):
            module = getattr(module, attr)
        return module

    def module_path(self, site: str, layer: int | None = None) -> str:
        """The model's own dotted path of a site's module, as mlx-lm names its parameters."""
        if site in ("embed", "lnf"):
            return f"{self.inner}.{self.embed if site == 'embed' else self.final_norm}"
        path = self.site_path(site)
        return f"{self.inner}.{self.layers}.{layer}" + (f".{path}" if path else "")


def _get(owner: Any, path: str) -> Any:
    """The attribute at a dotted path (`norm_attn_norm.attn`), or None."""
    for attr in path.split("."):
        owner = getattr(owner, attr, None)
    return owner


# Parts that may be a list of modules: the blocks, and what a block may hold several of (discover
# then marks those None). Any other list, like any non-module value, is never a part.
_LISTS = ("layers", "attn", "ln1", "ln2")


def _is_part(value: Any, part: str) -> bool:
    """A module (a non-empty list of modules where `_LISTS` allows): capture swaps a part's class,
    so a value of another type (a number, an array, a list) is never a part, whatever its name."""
    if isinstance(value, list):
        return part in _LISTS and bool(value) and all(isinstance(v, nn.Module) for v in value)
    return isinstance(value, nn.Module)


def _has_call(module: Any) -> bool:
    """Whether the module's class has its own __call__ (mlx.nn.Module has none)."""
    return any("__call__" in vars(c) for c in type(module).__mro__ if c not in (nn.Module, dict, object))


def _find(owner: Any, part: str) -> str | None:
    """The first candidate name of `part` that holds a module. A wrapper module the model never
    calls (exaone's `attn`: its blocks call `attn.attention`) gives way to the part it holds."""
    for name in CANDIDATES[part]:
        value = getattr(owner, name, None)
        if not _is_part(value, part):
            continue
        if part in ("attn", "mlp") and isinstance(value, nn.Module) and not _has_call(value):
            inner = _find(value, part)
            return f"{name}.{inner}" if inner else None
        return name
    return None


def discover(model: Any, model_type: str) -> Architecture:
    """The parts of a loaded mlx-lm model; raises LookupError naming what is missing."""
    inner_name = _find(model, "inner")
    inner = getattr(model, inner_name) if inner_name else None
    found: dict[str, str | None] = {"inner": inner_name}
    if inner is not None:
        found.update((p, _find(inner, p)) for p in ("layers", "embed", "final_norm"))
    blocks = getattr(inner, found["layers"] or "", None) if inner is not None else None
    block = blocks[0] if isinstance(blocks, list) and blocks else None
    if block is not None:
        found.update((p, _find(block, p)) for p in ("attn", "mlp", "ln1", "ln2"))
    notes = NOTES.get(model_type, {})
    found.update(notes)
    missing = [p for p in ("inner", "layers", "embed", "attn", "mlp") if not found.get(p)]
    if missing:
        raise LookupError(f"no {', '.join(missing)} found in the module tree")
    wrong = [f"{p}={path}" for p, path in notes.items() if path and not _is_part(_get(block, path), p)]
    if wrong:
        raise LookupError(f"no module at {', '.join(wrong)} (NOTES[{model_type!r}])")
    # A part a block holds several of (longcat_flash: two attentions and two of each norm) is no one module.
    found.update((p, None) for p in ("attn", "ln1", "ln2") if isinstance(_get(block, found[p] or ""), list))
    # Every block must have the part (some models mix dense and expert MLPs, or attention kinds).
    mlps = [_get(b, found["mlp"]) for b in blocks]
    mlp_outs = {_find(m, "mlp_out") for m in mlps}
    routers = {i: r for i, m in enumerate(mlps) if (r := _router(m))}
    attns = [_get(b, found["attn"]) for b in blocks] if found["attn"] else []
    attn_outs = {_find(a, "attn_out") for a in attns} or {None}
    seams = {_seam(a) for a in attns} or {None}
    return Architecture(name=model_type, **found, attn_out=attn_outs.pop() if len(attn_outs) == 1 else None,
                        mlp_out=mlp_outs.pop() if len(mlp_outs) == 1 else None,
                        seam=seams.pop() if len(seams) == 1 else None, absent=_absent(attns),
                        router=routers[min(routers)] if len(set(routers.values())) == 1 else None,
                        router_layers=tuple(routers) if len(set(routers.values())) == 1 else ())


def _router(mlp: Any) -> str | None:
    """The linear module of a mixture-of-experts block (one with mlx-lm's switch layers) whose output is the
    router logits, if it has one: a router that computes its logits inside a selection module
    (deepseek_v3's MoEGate, ...) has no such module."""
    if not any(type(m).__name__.startswith("Switch") for m in mlp.children().values() if isinstance(m, nn.Module)):
        return None
    name = _find(mlp, "router")
    return name if isinstance(getattr(mlp, name or "", None), (nn.Linear, nn.QuantizedLinear)) else None


# Multi-head latent attention as mlx-lm computes it (deepseek_v3, glm4_moe_lite, ...: the up-projections
# absorbed into `embed_q` / `unembed_out`): the seam gets the non-rotary parts of the queries and keys (in
# decode steps the query projected into the shared KV latent, and the latent as keys and values); the rotary
# part comes in as the mask, a score bias. Scores and patterns (their sum) are exact, per-head tensors not.
_MLA = "multi-head latent attention: the seam sees the compressed KV latent and the non-rotary part only"
_MLA_ABSENT = {
    "query": f"{_MLA}; per-head post-RoPE queries are never formed",
    "key": f"{_MLA}; per-head post-RoPE keys are never formed",
    "value": f"{_MLA}; decode steps attend over the shared latent, per-head values are never formed",
    "head_output": f"{_MLA}; decode steps give latent outputs, per-head outputs exist only after up-projection",
}
# DeepSeek sparse attention: decode steps attend over the indexer's top-k keys, gathered out of order.
_DSA = "sparse attention: decode steps see only the indexer's top-k keys, gathered, not the sequence's key axis"


def _absent(attns: list) -> tuple[tuple[str, str], ...]:
    """The seam components an attention does not give exactly, with why."""
    absent: dict[str, str] = {}
    if any(hasattr(a, "embed_q") and hasattr(a, "unembed_out") for a in attns):
        absent.update(_MLA_ABSENT)
    if any(hasattr(a, "indexer") for a in attns):
        absent.update((c, _DSA) for c in ("attention_scores", "attention_pattern", "query", "key", "value",
                                          "head_output") if c not in absent)
    return tuple(absent.items())


def _seam(attn: Any) -> str | None:
    """The module whose `scaled_dot_product_attention` the attention's __call__ calls, if it does."""
    call = type(attn).__call__
    try:
        source = inspect.getsource(call)
    except (TypeError, OSError):  # not Python code (e.g. a bare nn.Module)
        return None
    globals_ = getattr(call, "__globals__", {})
    if "scaled_dot_product_attention(" in source and "scaled_dot_product_attention" in globals_:
        return globals_["__name__"]
    return None


def model_arg(args: Any, name: str, default: Any = None) -> Any:
    """A model argument by any of its names (ARGS)."""
    return next((v for n in ARGS[name] if (v := getattr(args, n, None)) is not None), default)


def linear_in_features(linear: Any) -> int:
    """Input size of a (possibly quantized) linear layer: quantized weights pack 32 // bits
    values in each uint32."""
    width = int(linear.weight.shape[-1])
    return width * 32 // linear.bits if hasattr(linear, "bits") else width

