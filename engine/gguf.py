"""Convert a llama-family GGUF file into a float32 mlx-lm model folder.

`mx.load` reads GGUF (quantized tensors come back as mlx-style weight/scales/biases). To run
the result with mlx-lm's llama model we dequantize, rename tensors, undo llama.cpp's Q/K row
permutation, rebuild a byte-level BPE `tokenizer.json` from the GGUF vocabulary and merges,
and carry over the chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from engine.errors import ModelLoadError, UnsupportedArchitecture

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`; "\p{N}" first means single digits.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_INDIVIDUAL_DIGITS = {"smollm", "llama-bpe", "qwen2", "deepseek-llm"}

Progress = Callable[[int, int, str], None]
_ARG = "model_path"  # a GGUF file reaches us as engine.load's model_path


def _meta(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if hasattr(value, "item"):
        return value.item()
    return value


def _unpermute(w, n_heads: int):
    """Invert llama.cpp's convert_hf_to_gguf `permute` of Q/K rows (interleaved -> half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensors: dict, base: str):
    import mlx.core as mx

    weight = tensors[base + ".weight"]
    if base + ".scales" not in tensors:
        return weight.astype(mx.float32)
    scales, biases = tensors[base + ".scales"], tensors.get(base + ".biases")
    n_groups = scales.shape[-1]
    for group_size in (32, 64, 128, 256):
        n_values = n_groups * group_size
        bits = weight.shape[-1] * 32 // n_values
        if bits in (2, 3, 4, 5, 6, 8) and weight.shape[-1] * 32 == n_values * bits:
            return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    raise ModelLoadError(f"cannot dequantize GGUF tensor {base}: unsupported quantization layout", _ARG)


def _tokenizer_json(meta: dict) -> dict:
    if _meta(meta, "tokenizer.ggml.model") != "gpt2":
        raise UnsupportedArchitecture(
            f"GGUF tokenizer model {_meta(meta, 'tokenizer.ggml.model')!r} is not supported "
            "(only byte-level BPE, tokenizer.ggml.model = 'gpt2')", _ARG
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()] if "tokenizer.ggml.token_type" in meta else []
    merges = list(meta.get("tokenizer.ggml.merges", []))
    pre = _meta(meta, "tokenizer.ggml.pre", "default")
    split = [{"type": "Split", "pattern": {"Regex": _GPT2_SPLIT}, "behavior": "Isolated", "invert": False}]
    if pre in _INDIVIDUAL_DIGITS:
        split.insert(0, {"type": "Digits", "individual_digits": True})
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, types))
        if kind in (3, 4)  # control, user-defined
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": split
            + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def _probe(gguf_path: Path) -> None:
    """mx.load's GGUF reader crashes the process (SIGSEGV) on some malformed files: read it once in
    a child process first, so a bad file is a ModelLoadError instead of a dead server."""
    code = "import sys, mlx.core as mx; mx.load(sys.argv[1], return_metadata=True)"
    result = subprocess.run([sys.executable, "-c", code, str(gguf_path)], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        why = lines[-1] if result.returncode > 0 and lines else f"the GGUF reader crashed (exit {result.returncode})"
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {why}", _ARG)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Write a float32 mlx-lm folder (config, safetensors, tokenizer) for a llama-family GGUF."""
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _probe(gguf_path)
    try:
        tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as exc:  # mlx raises ValueError/RuntimeError with a terse message
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}", _ARG) from exc
    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is not supported (llama family only)", _ARG)

    n_layers = int(_meta(meta, "llama.block_count"))
    n_heads = int(_meta(meta, "llama.attention.head_count"))
    n_kv_heads = int(_meta(meta, "llama.attention.head_count_kv", n_heads))
    d_model = int(_meta(meta, "llama.embedding_length"))
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "model_type": "llama",
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "intermediate_size": int(_meta(meta, "llama.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": int(_meta(meta, "llama.rope.dimension_count", d_model // n_heads)),
        "rms_norm_eps": float(_meta(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(tokens),
        "rope_theta": float(_meta(meta, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(meta, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
        "bos_token_id": _meta(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(meta, "tokenizer.ggml.eos_token_id"),
    }

    weights = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for i, base in enumerate(bases):
        if progress:
            progress(i, len(bases), base)
        if base.startswith("blk."):
            _, layer, kind = base.split(".", 2)
            if kind not in _LAYER_TENSORS:
                raise UnsupportedArchitecture(f"unexpected GGUF tensor {base}", _ARG)
            name = f"model.layers.{layer}.{_LAYER_TENSORS[kind]}"
        elif base in _GLOBAL_TENSORS:
            name = _GLOBAL_TENSORS[base]
        else:
            continue  # e.g. rope_freqs: recomputed by mlx-lm from the config
        w = _dequantize(tensors, base)
        if base.endswith("attn_q"):
            w = _unpermute(w, n_heads)
        elif base.endswith("attn_k"):
            w = _unpermute(w, n_kv_heads)
        mx.eval(w)
        weights[name + ".weight"] = w
    if progress:
        progress(len(bases), len(bases), "tokenizer")

    eos_id = config["eos_token_id"]
    bos_id = config["bos_token_id"]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(_meta(meta, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "pad_token": tokens[int(_meta(meta, "tokenizer.ggml.padding_token_id", eos_id or 0))],
        "chat_template": _meta(meta, "tokenizer.chat_template"),
    }

    # Write into a temporary sibling and rename, so an interrupted conversion leaves no half folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(_tokenizer_json(meta), ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({k: tokenizer_config[k] for k in ("eos_token", "bos_token", "pad_token")}, indent=2)
        )
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} by nsbridge (float32, dequantized)\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
