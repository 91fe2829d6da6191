"""Every architecture of the zoo (tests/arch_zoo.py): mlx-lm's logits equal transformers'.

Each tiny random model is built once (cached under $NSBRIDGE_HOME/zoo, keyed by a hash of what
decides it), loaded with `mlx_lm.load`, and a 33-token prompt runs through mlx-lm and through
transformers (torch float32, eager attention, no cache). The ZOO entries must agree within 1e-3
relative to the logits' magnitude; the MLX_DIFFERENCES variants (settings where mlx-lm 0.32 really
computes something else) are strict xfails, so a fixed mlx-lm shows up as XPASS.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest

from tests.arch_zoo import MLX_DIFFERENCES, ZOO, hf_folder, make_zoo_model, zoo_key

TEXT = "John gave Mary the book because she asked for it. The answer is 42."  # 33 tokens
TOL = 1e-3

# All of this file takes ~15 s (every model is ~0.5 MB and builds in a fraction of a second), so
# nothing in it is marked slow. Heavier per-architecture tests can use `_params`: one or two of each
# family (dense, GPT-style, sliding window, MoE, MLA) stay quick, the rest are marked slow.
QUICK = {"llama", "qwen3", "gpt2", "gemma3_text", "cohere2", "phi", "gpt_neox", "mixtral", "qwen3_moe", "gpt_oss",
         "deepseek_v3"}


def _params(names):
    return [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in names]


def _zoo_root() -> Path:
    from engine import paths

    return paths.home() / "zoo"


def zoo_model(model_type: str, overrides: dict | None = None) -> Path:
    """The cached folder of a zoo model, built (atomically) if missing."""
    root = _zoo_root()
    folder = root / f"{model_type}-{zoo_key(model_type, overrides)}"
    if (folder / "config.json").exists():
        return folder
    tmp = root / f".{folder.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_zoo_model(tmp, model_type, overrides=overrides)
    try:
        tmp.rename(folder)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def prompt_ids(folder: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder(folder), attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(want).all() and np.isfinite(got).all()
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


def check(model_type: str, overrides: dict | None = None) -> None:
    folder = zoo_model(model_type, overrides)
    ids = prompt_ids(folder)
    assert 20 <= len(ids) <= 40
    want = hf_logits(folder, ids)
    got = mlx_logits(folder, ids)
    err = relative_error(got, want)
    assert err <= TOL, f"{model_type}: mlx-lm logits differ from transformers' by {err:.2e} (relative)"


@pytest.mark.parametrize("model_type", list(ZOO))
def test_mlx_lm_logits_match_transformers(model_type):
    check(model_type)


@pytest.mark.parametrize("model_type, overrides, why", [
    pytest.param(t, ov, why, id=f"{t}-{'-'.join(ov)}", marks=pytest.mark.xfail(strict=True, reason=why))
    for t, ov, why in MLX_DIFFERENCES
])
def test_known_mlx_lm_differences(model_type, overrides, why):
    check(model_type, overrides)


def test_zoo_folder_layout():
    """The folder is what mlx-lm reads; the transformers checkpoint (its own config.json) sits beside it."""
    import json

    folder = zoo_model("gpt2")
    assert (folder / "model.safetensors").exists() and (hf_folder(folder) / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "_zoo_legacy_keys" not in json.loads(
        (hf_folder(folder) / "config.json").read_text())
    assert set(config["_zoo_legacy_keys"]) <= set(config)
