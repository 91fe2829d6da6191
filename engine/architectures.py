"""Where each supported mlx-lm architecture keeps its parts.

Capture works on module instances (embedding, decoder blocks, their attention, MLP and norms)
and on the `scaled_dot_product_attention` that the model file imports from mlx-lm's base.
Adding an architecture means naming its parts here and adding a tiny model to the tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    inner: str  # attribute of the top-level Model holding the transformer
    layers_attr: str
    embed_attr: str
    final_norm_attr: str
    attn_attr: str
    mlp_attr: str
    mlp_out_attr: str  # the MLP's output projection, whose input is the neurons (mlp_activation)
    ln1_attr: str  # norm before attention
    ln2_attr: str  # norm before the MLP
    args_d_model: str
    args_n_heads: str
    args_n_kv_heads: str
    args_context: str
    args_d_mlp: str | None = None  # None: 4 * d_model (GPT-2; mlx-lm ignores n_inner)
    default_context: int = 4096

    def _inner(self, model):
        return getattr(model, self.inner)

    def layers(self, model) -> list:
        return getattr(self._inner(model), self.layers_attr)

    def embedding(self, model):
        return getattr(self._inner(model), self.embed_attr)

    def final_norm(self, model):
        return getattr(self._inner(model), self.final_norm_attr)

    def attention(self, block):
        return getattr(block, self.attn_attr)

    def d_model(self, args) -> int:
        return getattr(args, self.args_d_model)

    def n_heads(self, args) -> int:
        return getattr(args, self.args_n_heads)

    def n_kv_heads(self, args) -> int:
        return getattr(args, self.args_n_kv_heads, None) or self.n_heads(args)

    def d_mlp(self, args) -> int:
        return getattr(args, self.args_d_mlp) if self.args_d_mlp else 4 * self.d_model(args)

    def context_length(self, args) -> int:
        return getattr(args, self.args_context, None) or self.default_context

    def module_path(self, part: str, layer: int | None = None) -> str:
        """The model's own dotted path of a part, as mlx-lm names its parameters."""
        if layer is None:
            attr = {"embed": self.embed_attr, "final_norm": self.final_norm_attr}[part]
            return f"{self.inner}.{attr}"
        block = f"{self.inner}.{self.layers_attr}.{layer}"
        sub = {"block": None, "attn": self.attn_attr, "mlp": self.mlp_attr, "ln1": self.ln1_attr, "ln2": self.ln2_attr,
               "mlp_post": f"{self.mlp_attr}.{self.mlp_out_attr}"}[part]
        return block if sub is None else f"{block}.{sub}"


LLAMA = Architecture(
    name="llama", inner="model", layers_attr="layers", embed_attr="embed_tokens", final_norm_attr="norm",
    attn_attr="self_attn", mlp_attr="mlp", mlp_out_attr="down_proj", ln1_attr="input_layernorm",
    ln2_attr="post_attention_layernorm", args_d_model="hidden_size", args_n_heads="num_attention_heads",
    args_n_kv_heads="num_key_value_heads", args_context="max_position_embeddings", args_d_mlp="intermediate_size",
)
GPT2 = Architecture(
    name="gpt2", inner="model", layers_attr="h", embed_attr="wte", final_norm_attr="ln_f",
    attn_attr="attn", mlp_attr="mlp", mlp_out_attr="c_proj", ln1_attr="ln_1", ln2_attr="ln_2",
    args_d_model="n_embd", args_n_heads="n_head", args_n_kv_heads="num_key_value_heads",
    args_context="n_positions",
)

# mlx-lm model_type -> parts. Mistral loads through mlx-lm's llama.py; Qwen2/3 share llama's layout.
ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gpt2": GPT2}
