"""A zoo of tiny random-weight models, one per mlx-lm architecture that transformers also implements.

`ZOO` maps an mlx-lm model_type (the config's model_type) to the keyword arguments of a tiny
Hugging Face config: hidden 64, 2-4 layers, 4 heads (2 kv heads where the model has GQA), head_dim
16, intermediate 128, MoE with 4 experts top-2, sliding windows of 8 tokens (so that a 20-40 token
prompt really crosses them), and enough layers that every kind of layer (sliding/full, dense/MoE,
rope/no-rope, KV-sharing) occurs at least once. Every entry's mlx-lm logits equal transformers'
(tests/test_arch_zoo.py); `MLX_DIFFERENCES` lists the real-checkpoint settings where they do not,
`SKIPPED` the candidates left out and why.

`make_zoo_model(folder, model_type)` builds one with transformers (torch CPU, float32), widens its
random init like `tests.tiny_models.make_tiny_model` does, and saves it with the tiny tokenizer of
tests.tiny_models: `folder` is what mlx-lm loads, `hf_folder(folder)` transformers' own checkpoint.

Config keys: transformers 5 writes some settings only in their new form (`rope_theta` and
`partial_rotary_factor` inside `rope_parameters`, `num_local_experts` for `num_experts`, per-layer-type
rope parameters, `layer_types` for a sliding-window pattern). mlx-lm reads the older top-level keys
that hub checkpoints carry, so the mlx-lm config.json also has those (see `_legacy_keys`), listed
under "_zoo_legacy_keys". Without them mlx-lm fails to load some architectures and silently falls
back to its own defaults for others (phi, deepseek_v3, ...).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tests.tiny_models import write_tokenizer

ZOO_VERSION = 1  # bump when make_zoo_model's output changes for the same ZOO entry

D = 64  # hidden size
_ATTN = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)
_DENSE = dict(_ATTN, intermediate_size=128, num_hidden_layers=2)
_MOE4 = dict(num_experts_per_tok=2)  # plus the arch's name for "4 experts"
_WINDOW = 8
_ROPE = dict(rope_theta=10000.0)
VOCAB = "<vocab>"  # stands for the tiny tokenizer's vocabulary size
# Multi-head latent attention (DeepSeek-style): transformers' head_dim is the rotary part of a head.
_MLA = dict(_DENSE, num_key_value_heads=4, head_dim=8)


def _longrope(rotary_dim: int, long_factor: list, short_factor: list | None = None) -> dict:
    """Phi-3 style "longrope" (SuScaledRoPE); factors per rotary frequency."""
    assert len(long_factor) == rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "long_factor": long_factor, "short_factor": short_factor or long_factor}


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def _types(*kinds: str) -> list[str]:
    return [{"s": "sliding_attention", "f": "full_attention"}[k] for k in kinds]


ZOO: dict[str, dict] = {
    # ---- llama family: pre-norm, o_proj / down_proj (SwiGLU) ----
    "llama": dict(_DENSE, **_ROPE, tie_word_embeddings=False),
    "mistral": dict(_DENSE, **_ROPE, sliding_window=None),
    "qwen2": dict(_DENSE, **_ROPE),
    "qwen3": dict(_DENSE, **_ROPE),
    "helium": dict(_DENSE, **_ROPE),
    "internlm3": dict(_DENSE, **_ROPE),
    "exaone": dict(_DENSE, **_ROPE),
    "granite": dict(_DENSE, **_ROPE, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                    attention_multiplier=0.125),
    "smollm3": dict(_DENSE, **_ROPE, num_hidden_layers=3, no_rope_layer_interval=3),
    "hunyuan_v1_dense": dict(_DENSE, **_ROPE),
    "seed_oss": dict(_DENSE, **_ROPE, attention_bias=True),
    "ernie4_5": dict(_DENSE, **_ROPE, tie_word_embeddings=False),
    # Ministral 3: YaRN rope plus Llama-4 style attention temperature past original_max_position_embeddings.
    "ministral3": dict(_DENSE, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 16,
        "max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1}),
    "apertus": dict(_DENSE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "nanochat": dict(_DENSE, num_key_value_heads=4, **_ROPE),
    "glm": dict(_DENSE, **_ROPE, partial_rotary_factor=1.0),  # real GLM-4: 0.5, see MLX_DIFFERENCES
    "glm4": dict(_DENSE, **_ROPE, partial_rotary_factor=0.5),
    "phi3": dict(_DENSE, **_ROPE),
    "olmo2": dict(_DENSE, **_ROPE),
    "olmo3": dict(_DENSE, num_hidden_layers=2, sliding_window=_WINDOW, layer_types=_types("s", "f"),
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "cohere": dict(_DENSE, **_ROPE, logit_scale=0.5, use_qk_norm=True),
    "cohere2": dict(_DENSE, **_ROPE, logit_scale=0.5, num_hidden_layers=4, sliding_window=_WINDOW,
                    layer_types=_types("s", "s", "s", "f")),
    "starcoder2": dict(_DENSE, **_ROPE, sliding_window=None),
    "stablelm": dict(_DENSE, **_ROPE, partial_rotary_factor=0.25, use_qkv_bias=True),
    "phi": dict(_DENSE, **_ROPE, num_key_value_heads=4, partial_rotary_factor=0.5),
    "nemotron": dict(_DENSE, **_ROPE, partial_rotary_factor=0.5),
    "exaone4": dict(_DENSE, **_ROPE, num_hidden_layers=4, sliding_window=_WINDOW,
                    sliding_window_pattern="LLLG", layer_types=_types("s", "s", "s", "f")),
    # ---- gemma family: (1 + w) RMSNorm, scaled embedding, sandwich norms from gemma2 on ----
    "gemma": dict(_DENSE, **_ROPE),
    "gemma2": dict(_DENSE, **_ROPE, query_pre_attn_scalar=16, sliding_window=256,  # see MLX_DIFFERENCES
                   layer_types=_types("s", "f")),
    "gemma3_text": dict(_DENSE, query_pre_attn_scalar=16, num_hidden_layers=3, sliding_window=_WINDOW,
                        layer_types=_types("s", "s", "f"),
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Gemma 4: per-layer input embeddings, wider full-attention heads, the last 2 layers reuse earlier KV.
    "gemma4_text": dict(_DENSE, num_hidden_layers=4, sliding_window=_WINDOW,
                        layer_types=_types("s", "f", "s", "f"), num_kv_shared_layers=2, global_head_dim=32,
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                        final_logit_softcapping=30.0),
    # ---- GPT-style: fused or separate qkv, LayerNorm, GELU MLPs, some parallel blocks ----
    "gpt2": dict(n_embd=D, n_layer=2, n_head=4, n_positions=256, n_ctx=256),
    "gpt_bigcode": dict(n_embd=D, n_layer=2, n_head=4, n_positions=256, n_inner=128, multi_query=True),
    "gpt_neox": dict(_DENSE, intermediate_size=4 * D, num_key_value_heads=4, **_ROPE, partial_rotary_factor=0.25,
                     use_parallel_residual=True),
    "gptj": dict(n_embd=D, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),  # mlx-lm: MLP is 4 * n_embd
    # ---- mixture of experts ----
    "mixtral": dict(_DENSE, **_ROPE, num_local_experts=4, **_MOE4),
    "phimoe": dict(_DENSE, **_ROPE, num_local_experts=4, router_jitter_noise=0.0, input_jitter_noise=0.0,
                   attention_bias=True, lm_head_bias=True, **_MOE4),
    "qwen2_moe": dict(_DENSE, **_ROPE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      **_MOE4),
    "qwen3_moe": dict(_DENSE, **_ROPE, num_experts=4, moe_intermediate_size=64, norm_topk_prob=True, **_MOE4),
    "olmoe": dict(_DENSE, **_ROPE, num_experts=4, **_MOE4),
    "granitemoe": dict(_DENSE, **_ROPE, num_local_experts=4, embedding_multiplier=2.0, residual_multiplier=0.5,
                       logits_scaling=4.0, attention_multiplier=0.125, **_MOE4),
    "ernie4_5_moe": dict(_DENSE, **_ROPE, tie_word_embeddings=False, moe_num_experts=4, moe_k=2, _router_bias=False,
                         moe_intermediate_size=64, moe_num_shared_experts=1, moe_layer_start_index=1,
                         moe_layer_end_index=1, num_hidden_layers=2),
    "dbrx": dict(d_model=D, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    "gpt_oss": dict(_DENSE, num_local_experts=4, sliding_window=_WINDOW, layer_types=_types("s", "f"),
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_MOE4),
    # mlx-lm's llama4_text is the dense text model (e.g. MobileLLM-R1): no MoE layers, no chunked attention.
    "llama4_text": dict(_ATTN, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4, moe_layers=[],
                        no_rope_layers=[1, 1, 1, 0], attention_chunk_size=256, tie_word_embeddings=True,
                        use_qk_norm=False, **_ROPE),
    "dots1": dict(_DENSE, **_ROPE, n_routed_experts=4, moe_intermediate_size=64, n_shared_experts=1,
                  first_k_dense_replace=1, **_MOE4),
    "glm4_moe": dict(_DENSE, **_ROPE, partial_rotary_factor=0.5, n_routed_experts=4, moe_intermediate_size=64,
                     n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True, **_MOE4),
    "afmoe": dict(_DENSE, **_ROPE, num_hidden_layers=3, num_experts=4, moe_intermediate_size=64,
                  num_shared_experts=1, num_dense_layers=1, sliding_window=_WINDOW,
                  layer_types=_types("s", "f", "s"), **_MOE4),
    "exaone_moe": dict(_DENSE, **_ROPE, num_hidden_layers=4, sliding_window=_WINDOW,
                       sliding_window_pattern=4, layer_types=_types("s", "s", "s", "f"),
                       num_experts=4, moe_intermediate_size=64, num_shared_experts=1, first_k_dense_replace=1,
                       mlp_layer_types=["dense", "sparse", "sparse", "sparse"], **_MOE4),
    # MiniMax-M2 (transformers' "minimax" is MiniMax-Text-01, a linear-attention hybrid mlx-lm lacks).
    "minimax_m2": dict(_DENSE, **_ROPE, rotary_dim=8, num_local_experts=4, **_MOE4),
    "solar_open": dict(_DENSE, **_ROPE, n_routed_experts=4, moe_intermediate_size=64, n_shared_experts=1,
                       **_MOE4),
    "mellum": dict(_DENSE, num_hidden_layers=2, sliding_window=_WINDOW, layer_types=_types("s", "f"),
                   num_local_experts=4, moe_intermediate_size=64, mlp_layer_types=["sparse", "sparse"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 100000.0}},
                   **_MOE4),
    "laguna": dict(_DENSE, num_hidden_layers=2, sliding_window=_WINDOW, layer_types=_types("s", "f"),
                   num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                   mlp_layer_types=["dense", "sparse"], num_attention_heads_per_layer=[4, 4],
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0,
                                                       "partial_rotary_factor": 0.5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 1.0}},
                   **_MOE4),
    # ---- multi-head latent attention (DeepSeek-style) ----
    "deepseek_v2": dict(_MLA, rope_parameters=_YARN, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                        moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
                        topk_method="greedy", **_MOE4),
    "deepseek_v3": dict(_MLA, rope_parameters=_YARN, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                        moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1, **_MOE4),
    "glm4_moe_lite": dict(_MLA, **_ROPE, q_lora_rank=32, kv_lora_rank=16,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                          moe_intermediate_size=64, n_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                          n_group=1, topk_group=1, **_MOE4),
    "minicpm3": dict(_MLA, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                     v_head_dim=16, scale_emb=4.0, scale_depth=1.4, dim_model_base=32, tie_word_embeddings=False,
                     rope_parameters=_longrope(8, [1.0, 2.0, 4.0, 8.0])),
    "longcat_flash": dict(hidden_size=D, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=256, ffn_hidden_size=128, q_lora_rank=32, kv_lora_rank=16,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8,
                          moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=64,
                          **_ROPE),
    # DeepSeek sparse attention: a lightning indexer keeps the top index_topk keys per query.
    "deepseek_v32": dict(_MLA, rope_parameters=_YARN, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, moe_intermediate_size=64,
                         n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"],
                         n_group=1, topk_group=1, index_topk=8, index_head_dim=16, index_n_heads=16, **_MOE4),
    "glm_moe_dsa": dict(_MLA, **_ROPE, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, moe_intermediate_size=64,
                        n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"],
                        n_group=1, topk_group=1, index_topk=8, index_head_dim=16, index_n_heads=16, **_MOE4),
}

# Settings real checkpoints use where mlx-lm 0.32's logits differ from transformers' (the ZOO entry
# leaves them out so that its model agrees): (model_type, ZOO overrides, what mlx-lm does).
MLX_DIFFERENCES: list[tuple[str, dict, str]] = [
    ("glm", dict(partial_rotary_factor=0.5),
     "glm.py rotates the whole head (ignores partial_rotary_factor; GLM-4-9B uses 0.5, ml-explore/mlx-lm#1698)"),
    ("gemma2", dict(sliding_window=_WINDOW), "gemma2.py has no sliding window (every layer attends globally)"),
    ("mistral", dict(sliding_window=_WINDOW),
     "mistral loads with llama.py, which windows only layers listed as sliding in layer_types"),
    ("starcoder2", dict(sliding_window=_WINDOW), "starcoder2.py has no sliding window"),
    ("phi3", dict(sliding_window=_WINDOW), "phi3.py has no sliding window"),
    ("phi3", dict(rope_parameters=_longrope(16, [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0], [1.0] * 8)),
     "SuScaledRoPE always uses long_factor; transformers uses short_factor up to original_max_position_embeddings"),
    ("minicpm3", dict(rope_parameters=_longrope(8, [1.0, 2.0, 4.0, 8.0], [1.0, 1.2, 1.5, 2.0])),
     "SuScaledRoPE always uses long_factor; transformers uses short_factor up to original_max_position_embeddings"),
    ("minicpm3", dict(tie_word_embeddings=True),
     "with tied embeddings minicpm3.py skips the hidden_size / dim_model_base logits scaling"),
    ("llama4_text", dict(use_qk_norm=True),
     "llama4_text.py applies the QK norm on NoPE layers too; transformers only on RoPE layers"),
    ("ernie4_5_moe", dict(_router_bias=True),
     "ernie4_5_moe.py drops e_score_correction_bias, which transformers adds to the scores to select experts"),
]

# Candidates (mlx-lm model files transformers also implements) with no ZOO entry, and why.
SKIPPED: dict[str, str] = {
    "olmo": "mlx-lm's olmo.py needs the ai2-olmo package (original OLMo-1 checkpoints)",
    "bitnet": "mlx-lm reads packed ternary weights (+ weight_scale); transformers' float BitNet has none",
    "mimo_v2_flash": "mlx-lm wants MiMo's own config keys (hybrid_layer_pattern, swa_*, sink flags: 14+)",
    "minimax": "transformers' minimax is MiniMax-Text-01 (lightning-attention hybrid); mlx-lm's minimax.py "
               "is MiniMax-M2 (see minimax_m2)",
    "hunyuan_v1_moe": "no mlx-lm file (mlx-lm's hunyuan.py is another config format)",
}

# Expert-selection biases (DeepSeek-V3 style "aux-loss-free" routing): random unless "_router_bias": False.
ROUTER_BIAS = re.compile(r"(e_score_correction_bias|expert_bias)$")

# Weight scale applied to >= 2-D parameters (random init is tiny; attention would be uniform).
DEFAULT_SCALE = 8.0
SCALE: dict[str, float] = {}

# mlx-lm reads these checkpoints in the hub's layout: the bare base model (no "transformer." prefix).
BARE_BASE = {"gpt2"}


def _gpt_oss_weights(weights: dict) -> dict:
    """transformers' fused experts (gate_up_proj [E, d, 2I], gate/up interleaved; down_proj [E, I, d]) in
    mlx-lm's own layout (per-projection [E, out, in]); mlx-lm's sanitize only unfuses the MXFP4 originals."""
    out = {}
    for k, v in weights.items():
        head, _, name = k.rpartition(".")
        if not head.endswith("mlp.experts"):
            out[k] = v
        elif name == "gate_up_proj":
            out[f"{head}.gate_proj.weight"] = v[..., ::2].transpose(0, 2, 1)
            out[f"{head}.up_proj.weight"] = v[..., 1::2].transpose(0, 2, 1)
        elif name == "gate_up_proj_bias":
            out[f"{head}.gate_proj.bias"], out[f"{head}.up_proj.bias"] = v[..., ::2], v[..., 1::2]
        elif name == "down_proj":
            out[f"{head}.down_proj.weight"] = v.transpose(0, 2, 1)
        elif name == "down_proj_bias":
            out[f"{head}.down_proj.bias"] = v
        else:
            raise KeyError(k)
    return out


def _nanochat_weights(weights: dict) -> dict:
    """transformers' names -> the original nanochat names mlx-lm expects (it has no sanitize)."""
    subs = [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.layers\.", "transformer.h."),
            (r"\.self_attn\.([qkv])_proj\.", r".attn.c_\1."), (r"\.self_attn\.o_proj\.", ".attn.c_proj."),
            (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj.")]
    out = {}
    for k, v in weights.items():
        for pat, rep in subs:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def _longcat_flash_weights(weights: dict) -> dict:
    """transformers stores gate/up rows for the parameter-free "zero" (identity) experts too; mlx-lm
    has only the routed experts."""
    n = ZOO["longcat_flash"]["n_routed_experts"]
    zero = re.compile(r"\.mlp\.experts\.(\d+)\.")
    return {k: v for k, v in weights.items() if not ((m := zero.search(k)) and int(m.group(1)) >= n)}


# Architectures whose weights mlx-lm reads in a layout transformers does not write (converted for
# the mlx-lm folder; the transformers checkpoint in hf_folder keeps its own).
MLX_WEIGHTS = {"gpt_oss": _gpt_oss_weights, "nanochat": _nanochat_weights, "longcat_flash": _longcat_flash_weights}


def hf_folder(folder: Path) -> Path:
    """Where transformers' own checkpoint of the zoo model built in `folder` lies."""
    return Path(folder) / "hf"


# Top-level keys hub checkpoints of these architectures carry that transformers 5 no longer writes.
EXTRA_LEGACY_KEYS: dict[str, dict] = {
    "gemma3_text": {"sliding_window_pattern": 3},
    "cohere2": {"sliding_window_pattern": 4},
    "apertus": {"mlp_bias": False, "post_norm": False, "qk_norm": True},
    "solar_open": {"first_k_dense_replace": 0, "partial_rotary_factor": 1.0},
    "minimax_m2": {"shared_intermediate_size": 0},
    "gemma4_text": {"global_head_dim": 32},
    "glm_moe_dsa": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1},
    "longcat_flash": {"attention_method": "MLA", "zero_expert_type": "identity", "mla_scale_q_lora": True,
                      "mla_scale_kv_lora": True},
}


def zoo_key(model_type: str, overrides: dict | None = None) -> str:
    """A short hash of everything that decides the model built for `model_type`."""
    import transformers

    spec = {"v": ZOO_VERSION, "kwargs": {**ZOO[model_type], **(overrides or {})},
            "scale": SCALE.get(model_type, DEFAULT_SCALE), "bare": model_type in BARE_BASE,
            "mlx_weights": model_type in MLX_WEIGHTS, "legacy": EXTRA_LEGACY_KEYS.get(model_type),
            "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def hf_config(model_type: str, n_vocab: int, overrides: dict | None = None):
    from transformers import AutoConfig

    kwargs = dict(vocab_size=n_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(ZOO[model_type])
    kwargs.update(overrides or {})
    kwargs = {k: n_vocab if v == VOCAB else v for k, v in kwargs.items() if not k.startswith("_")}
    return AutoConfig.for_model(model_type, **kwargs)


def _legacy_keys(model_type: str, config: dict, config_cls) -> dict:
    """Top-level keys in their pre-transformers-5 form, for those config.json lacks."""
    extra: dict = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "full_attention" in rope or "sliding_attention" in rope:
            glob = rope.get("full_attention") or rope["sliding_attention"]
            if "sliding_attention" in rope:
                extra["rope_local_base_freq"] = rope["sliding_attention"].get("rope_theta")
        else:
            glob = rope
        if "rope_theta" in glob:
            extra["rope_theta"] = glob["rope_theta"]
        if "partial_rotary_factor" in glob:
            extra["partial_rotary_factor"] = glob["partial_rotary_factor"]
        rope_type = glob.get("rope_type", glob.get("type", "default"))
        extra["rope_scaling"] = None if rope_type == "default" else {
            "type": rope_type, **{k: v for k, v in glob.items() if k not in ("rope_theta", "partial_rotary_factor")}}
    for legacy, new in getattr(config_cls, "attribute_map", {}).items():
        if new in config:
            extra[legacy] = config[new]
    if "mlp_layer_types" in config:
        extra["is_moe_layer"] = [t == "sparse" for t in config["mlp_layer_types"]]
    if model_type == "minimax_m2":
        extra["rotary_dim"] = int(config["head_dim"] * extra.get("partial_rotary_factor", 1.0))
    if model_type == "gpt_neox":
        extra["rotary_pct"] = extra.get("partial_rotary_factor", 1.0)
        extra["rotary_emb_base"] = extra.get("rope_theta", 10000.0)
    extra = {k: v for k, v in extra.items() if k not in config}
    extra.update(EXTRA_LEGACY_KEYS.get(model_type, {}))
    return extra


def make_zoo_model(folder: Path, model_type: str, seed: int = 0, overrides: dict | None = None) -> Path:
    """Create (once) the tiny random `model_type` model of the zoo in `folder` and return `folder`.

    `folder` is what mlx-lm loads (its weight layout, config.json with the older top-level keys);
    `hf_folder(folder)` is the same model as transformers saved it (its own config.json, which the
    older keys would override). `overrides` replace some ZOO kwargs (e.g. those of MLX_DIFFERENCES).
    """
    import os
    import shutil

    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = write_tokenizer(folder)
    config = hf_config(model_type, n_vocab, overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > 3_000_000:
        raise ValueError(f"{model_type}: {n_params} parameters; a ZOO kwarg was not taken")
    scale = SCALE.get(model_type, DEFAULT_SCALE)
    router_bias = {**ZOO[model_type], **(overrides or {})}.get("_router_bias", True)
    with torch.no_grad():
        biases = [(n, b) for n, b in model.named_buffers() if ROUTER_BIAS.search(n)]
        for name, p in [*model.named_parameters(), *biases]:
            if ROUTER_BIAS.search(name):  # expert-selection biases start at zero; make them count
                if router_bias:
                    p.normal_(0.0, 0.1)
            elif p.dim() >= 2:
                if not p.any():  # zero-initialised (e.g. some routers): every expert would tie
                    p.normal_(0.0, 0.02)
                p.mul_(scale)
    hf_dir = hf_folder(folder)
    (model.base_model if model_type in BARE_BASE else model).save_pretrained(hf_dir, safe_serialization=True)
    convert = MLX_WEIGHTS.get(model_type)
    if convert is None:  # the same files (hard links where the file system has them)
        for f in sorted(hf_dir.glob("model*.safetensors*")):
            (folder / f.name).unlink(missing_ok=True)
            try:
                os.link(f, folder / f.name)
            except OSError:
                shutil.copyfile(f, folder / f.name)
    else:
        weights = {}
        for f in sorted(hf_dir.glob("model*.safetensors")):
            weights.update(load_file(f))
        save_file({k: v.copy() for k, v in convert(weights).items()}, folder / "model.safetensors")
    saved = json.loads((hf_dir / "config.json").read_text())
    legacy = _legacy_keys(model_type, saved, type(config))
    try:  # mlx-lm loads the tokenizer with transformers, which reads config.json too
        type(config).from_dict({**saved, **legacy})
    except (KeyError, ValueError, TypeError):  # e.g. a legacy rope key clashing with per-layer-type rope
        legacy = {k: v for k, v in legacy.items() if not k.startswith("rope_")}
    saved.update(legacy, _zoo_legacy_keys=sorted(legacy))
    (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True, default=str))
    return folder
