"""Tiny random-weight models in Hugging Face layout, built with transformers (torch CPU).

The same folder loads in mlx-lm (what the server runs) and in transformers (the independent
reference the fidelity tests compare against). The tokenizer is a small byte-level BPE
trained with `tokenizers` on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "John gave Mary the book because she asked for it.",
    "Hello, how are you? I am fine, thank you! 0123456789",
    "user: assistant: system: What is the answer? The answer is 42.",
] * 20

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


def write_tokenizer(folder: Path) -> int:
    """Train the tiny tokenizer into `folder`; returns the model's vocabulary size (with the specials)."""
    _train_tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return max(vocab.values()) + 1 + len(SPECIAL)


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Create (once) a tiny random model of `arch` ("llama", "qwen2", "qwen3" or "gpt2") in `folder`."""
    import torch
    import transformers

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = write_tokenizer(folder)
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch in ("qwen2", "qwen3"):
        config_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.Qwen3Config
        config = config_cls(
            vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=n_vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256, n_ctx=256, eos_token_id=2, bos_token_id=1,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random init is tiny; widen it so attention patterns are not uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    # mlx-lm reads GPT-2 checkpoints in the hub's layout: the bare GPT2Model (no "transformer." prefix).
    (model.transformer if arch == "gpt2" else model).save_pretrained(folder, safe_serialization=True)
    return folder
