"""Quantized models (mlx-community's 4- and 8-bit checkpoints): they load, describe themselves and capture.

The quantized models are made from the tiny random models of tests.tiny_models with mlx-lm's own
converter (`mlx_lm.convert(..., quantize=True)`: affine 4- and 8-bit as mlx-community publishes,
and mxfp4/mxfp8). The reference is the same quantized model computed another way: every quantized weight is
dequantized with `mx.dequantize` into the float32 model loaded from the original folder, and our
engine captures that float model. Both then compute with the same numbers; what differs is the
kernel: `quantized_matmul` unpacks each weight (affine: `scale * q + bias`; mxfp4/mxfp8: a
power-of-two scale times an fp4/fp8 value) inside the kernel, the reference multiplies a plain
weight matrix holding those same values. The products are equal; only the float32 accumulation
order differs, so the activations agree to float32 rounding: a few ulp (1.2e-7 each) per sum of
<= 256 terms, grown by the three layers. We measure at most 3e-6 relative to the tensor's
magnitude (embeddings: exactly equal, a row lookup has no sum). TOL = 1e-4 leaves 30x headroom
and is still 100x below the quantization error itself: the same activations differ from the
original float model's by 2e-2 to 6e-2 at 8 bits and by ~1 at 4 bits (where the greedy tokens
change), so a model whose weights were read wrongly, or left unquantized, cannot pass.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest
import requests

from engine.generate import generate
from engine.hooks import hook_points
from engine.model import load_model
from engine.params import SamplingParams
from engine.plan import plan

TEXT = "John gave Mary the book because she asked for it."
MAX_TOKENS = 6
TOL = 1e-4  # see the module docstring
# The quantization error (and an ablation's effect) must be far above TOL, or the comparison would be blind.
MIN_QUANT_EFFECT = 1e-3

# (tiny architecture, bits, group size): the tiny models' widths (64, 128, 256 and the 323-row
# vocabulary's 64-wide rows) are multiples of both group sizes mlx-community uses.
VARIANTS = [("llama", 4, 32), ("llama", 8, 64), ("gpt2", 4, 64), ("gpt2", 8, 32)]
# mlx's microscaling formats (gpt-oss ships MXFP4; mlx-community publishes mxfp4/mxfp8 conversions).
MX_VARIANTS = [("llama", 4, 32, "mxfp4"), ("gpt2", 8, 32, "mxfp8")]


def quantize(src: Path, out: Path, bits: int, group_size: int, dtype: str | None = None, mode: str = "affine",
             **kwargs) -> Path:
    """mlx-lm's converter, as mlx-community runs it (quiet: it prints its progress)."""
    from mlx_lm import convert

    if not (out / "config.json").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(src), str(out), quantize=True, q_bits=bits, q_group_size=group_size, q_mode=mode,
                    dtype=dtype, **kwargs)
    return out


def dequantized_copy(quantized, float_folder: Path):
    """The float model of `float_folder` with every parameter replaced by the quantized model's,
    quantized weights dequantized (mx.dequantize) into plain float weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    ref = load_model(str(float_folder), "dequantized")
    qparams = dict(tree_flatten(quantized.model.parameters()))
    weights, n_dequantized = {}, 0
    for name, module in quantized.model.named_modules():
        if hasattr(module, "scales"):
            prefix = f"{name}." if name else ""
            # In the dtype mx.dequantize gives, which is what the quantized layers compute in: the
            # scales' dtype for affine quantization, bfloat16 for mxfp4/mxfp8 (uint8 exponent scales),
            # so a QuantizedEmbedding of a float32 model returns bfloat16 rows there (gpt2 then adds
            # its token and position embeddings in bfloat16). Every such value is exact in bfloat16.
            weights[prefix + "weight"] = mx.dequantize(
                module.weight, module.scales, getattr(module, "biases", None), group_size=module.group_size,
                bits=module.bits, mode=getattr(module, "mode", "affine"),
            )
            n_dequantized += 1
            for key in ("weight", "scales", "biases"):
                qparams.pop(prefix + key, None)
    weights.update(qparams)  # norms, linear biases: stored unquantized
    ref.model.load_weights(list(weights.items()), strict=True)
    mx.eval(ref.model.parameters())
    assert n_dequantized > 0
    return ref


def run(lm, prompt: list[int], hooks=None, interventions=None):
    events = list(generate(plan(lm, prompt=prompt, sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                hooks=hooks, interventions=interventions)))
    return events[-1].result


def all_hooks(lm) -> list[dict]:
    return [{"layer_name": p["name"]} for p in hook_points(lm)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|) over finite entries; masked (-inf) entries must match."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "masked entries differ"
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all()
    got, want = got[finite], want[finite]
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())) if want.size else 0.0


@pytest.fixture(scope="module")
def quantized(request, tmp_path_factory):
    """(arch, bits, group_size) -> (float folder, quantized folder, loaded quantized model), built once."""
    cache: dict = {}

    def get(arch: str, bits: int, group_size: int, mode: str = "affine"):
        key = (arch, bits, group_size, mode)
        if key not in cache:
            src = request.getfixturevalue(f"tiny_{arch}_path")
            out = quantize(src, tmp_path_factory.mktemp("quantized") / f"tiny-{arch}-{bits}bit-g{group_size}-{mode}",
                           bits, group_size, mode=mode)
            cache[key] = (src, out, load_model(str(out)))
        return cache[key]

    return get


@pytest.mark.parametrize("arch, bits, group_size", VARIANTS)
def test_describe_reports_the_quantization(quantized, arch, bits, group_size):
    _, folder, lm = quantized(arch, bits, group_size)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    info = lm.info
    assert info.quantization == {"bits": bits, "group_size": group_size, "mode": "affine"}
    assert info.dtype == "float32"  # the scales' dtype, not the packed weights' uint32
    assert info.to_dict()["quantization"] == {"bits": bits, "group_size": group_size, "mode": "affine"}
    # The sizes come out unpacked (a packed uint32 row holds 32 // bits values).
    assert (info.d_model, info.vocab_size) == (64, 323)
    assert info.d_mlp == (128 if arch == "llama" else 256)


def test_half_precision_scales_are_the_dtype(tiny_llama_path, tmp_path):
    """mlx-community's checkpoints keep scales and norms in bfloat16/float16: that is the dtype reported."""
    out = quantize(tiny_llama_path, tmp_path / "tiny-llama-4bit-bf16", 4, 64, dtype="bfloat16")
    lm = load_model(str(out))
    assert lm.info.dtype == "bfloat16" and lm.info.quantization == {"bits": 4, "group_size": 64, "mode": "affine"}
    prompt = lm.text_prompt(TEXT)
    res = run(lm, prompt, hooks=all_hooks(lm))
    arrays = res.capture.arrays()
    assert len(arrays) == len(hook_points(lm))
    for name, a in arrays.items():
        assert a.shape[0] == len(res.token_ids) and not np.isnan(a).any(), name


@pytest.mark.parametrize("arch, bits, group_size, mode", [(*v, "affine") for v in VARIANTS] + MX_VARIANTS)
def test_every_hook_point_equals_the_dequantized_model(quantized, arch, bits, group_size, mode):
    src, _, lm = quantized(arch, bits, group_size, mode)
    assert lm.info.quantization is not None
    ref = dequantized_copy(lm, src)
    prompt = lm.text_prompt(TEXT)
    points = hook_points(lm)
    assert [p["name"] for p in points] == [p["name"] for p in hook_points(ref)]
    got = run(lm, prompt, hooks=all_hooks(lm))
    want = run(ref, prompt, hooks=all_hooks(ref))
    assert got.token_ids == want.token_ids, "greedy tokens differ"
    assert len(got.token_ids) > len(prompt)
    g, w = got.capture.arrays(), want.capture.arrays()
    assert set(g) == set(w) == {p["name"] for p in points}
    errors = {name: relative_error(g[name], w[name]) for name in w}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: relative error {errors[worst]:.2e} (tolerance {TOL:.0e})"
    # QuantizedEmbedding unpacks a row exactly as mx.dequantize does: no sum, no rounding to differ.
    assert all(errors[p["name"]] == 0.0 for p in points if p["component"] == "embedding")
    # The comparison has teeth: the original float model computes measurably different activations.
    orig = run(load_model(str(src), "float"), prompt, hooks=all_hooks(ref)).capture.arrays()
    last = [p["name"] for p in points if p["component"] == "residual" and not p["is_input"]][-1]
    n = min(len(orig[last]), len(g[last]))
    assert relative_error(g[last][:n], orig[last][:n]) > max(MIN_QUANT_EFFECT, 100 * errors[worst])


def test_microscaling_models_report_their_compute_dtype(quantized):
    """mxfp4/mxfp8 scales are uint8 exponents: the dtype comes from the float parameters."""
    _, _, lm = quantized("llama", 4, 32, "mxfp4")
    assert lm.info.dtype == "float32" and lm.info.quantization["mode"] == "mxfp4"


def test_quantized_layers_with_a_float_embedding_report_the_quantization(tiny_llama_path, tmp_path):
    out = quantize(tiny_llama_path, tmp_path / "tiny-llama-4bit-float-embedding", 4, 32,
                   quant_predicate=lambda path, module, *_: "embed" not in path)
    lm = load_model(str(out))
    assert type(lm.model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(lm.model.model.embed_tokens).__name__ == "Embedding"
    assert lm.info.quantization == {"bits": 4, "group_size": 32, "mode": "affine"}


def test_interventions_on_a_quantized_model(quantized):
    """A zero ablation changes what the quantized model computes, reports the positions it touched,
    and equals the same ablation on the dequantized model."""
    src, _, lm = quantized("llama", 4, 32)
    prompt = lm.text_prompt(TEXT)
    n = len(prompt)
    hooks = [{"layer_name": "blocks.2.hook_resid_post"}, {"layer_name": "blocks.1.attn.hook_z"}]
    ablate = [{"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [0, 2]}]
    clean = run(lm, prompt, hooks=hooks)
    edited = run(lm, prompt, hooks=hooks, interventions=ablate)
    steps = len(edited.token_ids) - n + 1  # with hooks, the last token's own step runs too
    assert edited.interventions == [{"index": 0, "layer_name": "blocks.1.attn.hook_z", "component": "head_output",
                                     "op": "zero", "positions_touched": [n] + [1] * (steps - 1)}]
    z = edited.capture.arrays()["blocks.1.attn.hook_z"]  # [positions, heads, d_head]
    assert not z[:, [0, 2]].any() and z[:, [1, 3]].any()
    resid_clean = clean.capture.arrays()["blocks.2.hook_resid_post"]
    resid = edited.capture.arrays()["blocks.2.hook_resid_post"]
    assert relative_error(resid[:n], resid_clean[:n]) > MIN_QUANT_EFFECT  # the ablation changed the output
    assert edited.token_ids[n:] != clean.token_ids[n:]  # ... and the greedy continuation
    ref = run(dequantized_copy(lm, src), prompt, hooks=hooks, interventions=ablate)
    assert ref.token_ids == edited.token_ids
    assert relative_error(resid, ref.capture.arrays()["blocks.2.hook_resid_post"]) <= TOL


def test_server_reports_the_quantization(quantized, tmp_path):
    from tests.conftest import ServerProcess

    _, folder, _ = quantized("llama", 4, 32)
    server = ServerProcess(str(folder), tmp_path)
    try:
        card = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]
        assert card["id"] == folder.name.lower()
        assert card["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"} and card["dtype"] == "float32"
        assert (card["d_model"], card["d_mlp"], card["vocab_size"]) == (64, 128, 323)
        r = requests.post(server.base_url + "/v1/chat/completions/with_activations", timeout=60, json={
            "prompt": TEXT, "max_tokens": 3, "temperature": 0,
            "activation_hooks": [{"layer_name": "blocks.1.hook_mlp_out"}]})
        assert r.status_code == 200, r.text
        entries = r.json()["activations"]["blocks.1.hook_mlp_out"]
        assert entries[0]["shape"][-1] == 64 and all(np.isfinite(np.array(e["data"])).all() for e in entries)
    finally:
        server.stop()
