"""Where an mlx-lm model keeps its parts, found from its module tree.

Capture and interventions work on module instances (the embedding, the decoder blocks, their
attention, MLP, norms and output projections) and on the attention seam: the
`scaled_dot_product_attention` that a model file imports from mlx-lm's base, which receives
post-RoPE queries and keys. mlx-lm names modules as the Hugging Face checkpoints do, so a few
candidate names per part find them in almost every model file; `NOTES` records the models
where a name means something else (a post-norm where other models keep the pre-MLP norm).
A part a model does not have is None: its components are absent from the hook points and
refused by name, never substituted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

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
}
# Model types whose parts differ from what their names suggest.
_SANDWICH = {"ln2": "pre_feedforward_layernorm"}  # post_attention_layernorm normalises the attention's output
NOTES: dict[str, dict[str, str | None]] = {
    "gemma2": _SANDWICH, "gemma3": _SANDWICH, "gemma3_text": _SANDWICH,
    "olmo2": {"ln1": None, "ln2": None},  # post-norms only: the blocks take the raw residual stream
    "olmo3": {"ln1": None, "ln2": None},
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
    attn: str
    mlp: str
    ln1: str | None
    ln2: str | None
    attn_out: str | None  # inside attn: its input is each head's output (head_output)
    mlp_out: str | None  # inside mlp: its input is the neurons (mlp_activation); None if a block has experts
    seam: str | None  # the Python module whose scaled_dot_product_attention the attention calls (query ...)

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
        }[site]

    def has(self, site: str) -> bool:
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


def _find(owner: Any, part: str) -> str | None:
    return next((name for name in CANDIDATES[part] if getattr(owner, name, None) is not None), None)


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
    found.update(NOTES.get(model_type, {}))
    missing = [p for p in ("inner", "layers", "embed", "attn", "mlp") if not found.get(p)]
    if missing:
        raise LookupError(f"no {', '.join(missing)} found in the module tree")
    # Every block must have the part (some models mix dense and expert MLPs, or attention kinds).
    mlps = [getattr(b, found["mlp"]) for b in blocks]
    mlp_outs = {_find(m, "mlp_out") for m in mlps}
    attn_outs = {_find(getattr(b, found["attn"]), "attn_out") for b in blocks}
    seams = {_seam(getattr(b, found["attn"])) for b in blocks}
    return Architecture(name=model_type, **found, attn_out=attn_outs.pop() if len(attn_outs) == 1 else None,
                        mlp_out=mlp_outs.pop() if len(mlp_outs) == 1 else None,
                        seam=seams.pop() if len(seams) == 1 else None)


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

