"""The verification matrix: every architecture of the zoo, every component it has, against Hugging Face.

For each tiny random model of tests/arch_zoo.py (built once, cached), our engine generates greedily
with a KV cache, capturing every hook point the model lists (`GET /v1/activations/points`), for
the prompt and each decode step. The reference is transformers (torch float32, no cache) over the
final sequence, with forward hooks on the modules our hook points name (mlx-lm keeps Hugging
Face's module names, so our module paths find them), pre-hooks for the neurons (the MLP's output
projection's input), and an attention function wrapped around the model's own eager attention
that records post-RoPE queries, keys and values, the masked scaled scores, the probabilities it
really used and each head's output. Greedy tokens must be identical, every tensor within float32
tolerance.

Each architecture's largest error per component is written to $NSBRIDGE_HOME/zoo/verified.json;
`python -m tests.architectures_doc` turns it into docs/architectures.md.
"""

from __future__ import annotations

import json
import sys

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest

from engine.architectures import CANDIDATES
from engine.generate import generate
from engine.hooks import hook_points
from engine.model import load_model
from engine.params import SamplingParams
from engine.plan import plan
from tests.arch_zoo import ZOO, hf_folder
from tests.test_arch_zoo import _params, _zoo_root, prompt_ids, zoo_model
from vocabulary import COMPONENTS

MAX_TOKENS = 4
TOL = 1e-3  # relative to the tensor's magnitude, as the zoo's logits test (x8-widened random weights)
# Components whose reference comes from the attention function (see `_attention`).
SDPA = tuple(c for c, comp in COMPONENTS.items() if comp.site == "sdpa")
_ALTERNATIVES = {name: group for group in CANDIDATES.values() for name in group}


def hf_module(root, path: str):
    """The transformers module at one of our module paths: the same names, or where a model file
    renamed a part (mlx-lm's gpt_neox keeps its blocks in `h`), another name of that part. Two
    names of one part in a row (mlx-lm's exaone: `attn.attention`, a wrapper its blocks never call,
    and the attention in it) name one module where transformers has no wrapper (Llama's `self_attn`)."""
    module, previous = root, None
    for part in path.split("."):
        options = (part,) + tuple(a for a in _ALTERNATIVES.get(part, ()) if a != part)
        found = next((getattr(module, o) for o in options if getattr(module, o, None) is not None), None)
        if found is None and previous is not None and _ALTERNATIVES.get(part) == _ALTERNATIVES.get(previous):
            found = module
        if found is None:
            raise LookupError(f"{path}: no {part!r} in {type(root).__name__}")
        module, previous = found, part
    return module


def hf_reference(folder, ids: list[int], points: list[dict]) -> tuple[dict, np.ndarray]:
    """(hook point name -> [positions, ...] array over the whole sequence, logits)."""
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    ref: dict[str, np.ndarray] = {}
    sdpa_layers: dict[int, dict] = {}

    def keep(name, t):
        ref[name] = t.detach().to(torch.float32).numpy().copy()

    def attention(module, query, key, value, attention_mask, **kwargs):
        own = sys.modules[type(module).__module__].eager_attention_forward
        indices = kwargs.pop("indices", None)
        if indices is not None:  # DeepSeek sparse attention: fold the indexer's top-k into the mask, as eager does
            unpicked = torch.ones((*indices.shape[:2], key.shape[2]), dtype=torch.bool).scatter(
                -1, indices.long(), False).unsqueeze(1)
            attention_mask = attention_mask & ~unpicked if attention_mask.dtype == torch.bool else \
                attention_mask.masked_fill(unpicked, torch.finfo(query.dtype).min)
        out, weights = own(module, query, key, value, attention_mask, **kwargs)
        n_rep = query.shape[1] // key.shape[1]
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        scores = (query @ key.repeat_interleave(n_rep, dim=1).transpose(-1, -2)) * scaling
        if attention_mask is not None:
            mask = attention_mask[..., : key.shape[-2]]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:  # transformers' float masks use the dtype's minimum where we use -inf
                scores = torch.where(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"), scores + mask)
        sdpa_layers[module.layer_idx] = {
            "query": query[0], "key": key[0], "value": value[0], "attention_scores": scores[0],
            "attention_pattern": weights[0] if weights is not None else torch.softmax(scores[0], -1),
            "head_output": out[0].transpose(0, 1),
        }
        return out, weights

    AttentionInterface.register("nsbridge_matrix", attention)
    AttentionMaskInterface.register("nsbridge_matrix", eager_mask)  # the masks eager attention gets
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(folder), dtype=torch.float32,
                                                              attn_implementation="nsbridge_matrix").eval()
    for p in points:
        if p["component"] in SDPA:
            continue
        module = hf_module(model, p["module_path"])
        name = p["name"]
        if p["is_input"] or p["component"] == "mlp_activation":  # the neurons: what the output projection receives
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=name: keep(n, (args[0] if args else kwargs["hidden_states"])[0]),
                with_kwargs=True)
        elif p["component"] == "router":  # transformers' routers return (logits [tokens, experts], scores, indices)
            module.register_forward_hook(
                lambda _m, _a, out, n=name: keep(n, (o := out[0] if isinstance(out, tuple) else out).reshape(
                    -1, o.shape[-1])))
        elif p["component"] == "embedding" and hasattr(module, "embed_scale"):
            # Our embedding is what the embedding module returns, before any scale the model applies
            # (granite's embedding_multiplier in both libraries); transformers' scaled embeddings
            # (Gemma, MiniCPM3) apply theirs inside the module, mlx-lm after it.
            module.register_forward_hook(lambda m, _a, out, n=name: keep(n, out[0] / m.embed_scale.to(out.dtype)))
        else:
            module.register_forward_hook(
                lambda _m, _a, out, n=name: keep(n, (out[0] if isinstance(out, tuple) else out)[0]))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    for p in points:
        if p["component"] in SDPA and p["layer"] in sdpa_layers:
            keep(p["name"], sdpa_layers[p["layer"]][p["component"]])
    return ref, logits


def token_major(ref: np.ndarray, component: str) -> np.ndarray:
    """A reference tensor in our stored layout: per-head tensors [H, T, ...] become [T, H, ...]."""
    return np.moveaxis(ref, 1, 0) if COMPONENTS[component].per_head else ref


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    finite = np.isfinite(want)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "masked entries differ"
    got, want = got[finite], want[finite]
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())) if want.size else 0.0


def verify(model_type: str) -> dict:
    folder = zoo_model(model_type)
    lm = load_model(str(folder))
    points = hook_points(lm)
    prompt = prompt_ids(folder)
    events = list(generate(plan(lm, prompt=prompt, sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                hooks=[{"layer_name": p["name"]} for p in points])))
    result = events[-1].result
    ref, logits = hf_reference(folder, result.token_ids, points)
    # Greedy tokens: the reference's argmax at each generating position.
    n = len(prompt)
    assert result.token_ids[n:] == [int(t) for t in logits[n - 1:-1].argmax(-1)], "greedy tokens differ"
    arrays = result.capture.arrays()
    errors: dict[str, float] = {}
    missing = []
    for p in points:
        if p["name"] not in ref:
            missing.append(p["name"])
            continue
        want = token_major(ref[p["name"]], p["component"])
        got = arrays[p["name"]]
        err = relative_error(got, want)
        errors[p["component"]] = max(errors.get(p["component"], 0.0), err)
        assert err <= TOL, f"{model_type} {p['name']}: relative error {err:.2e}"
    return {"architecture": model_type, "components": errors, "not_referenced": missing,
            "decode_steps": MAX_TOKENS, "prompt_tokens": n, "seam": lm.arch.seam}


@pytest.mark.parametrize("model_type", _params(ZOO))
def test_every_component_equals_transformers(model_type):
    record = verify(model_type)
    path = _zoo_root() / "verified.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[model_type] = record
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    assert not record["not_referenced"], f"no reference for {record['not_referenced'][:5]}"


def test_router_interventions_change_the_expert_choice():
    """The router's logits come before the top-k: raising one expert's logit by a lot makes every token
    choose it, so the expert block's output changes; the logits captured after the change show it."""
    lm = load_model(str(zoo_model("mixtral")))
    prompt = prompt_ids(zoo_model("mixtral"))
    hooks = [{"layer_name": "blocks.1.mlp.hook_router"}, {"layer_name": "blocks.1.hook_mlp_out"}]

    def run(interventions=()):
        events = list(generate(plan(lm, prompt=prompt, sampling=SamplingParams(max_tokens=2, temperature=0),
                                    hooks=hooks, interventions=list(interventions))))
        return events[-1].result.capture.arrays()

    clean = run()
    expert = int(np.argmin(clean["blocks.1.mlp.hook_router"][-1]))
    push = [0.0] * lm.info.n_experts
    push[expert] = 1e4
    changed = run([{"layer_name": "blocks.1.mlp.hook_router", "op": "add", "vector": push}])
    assert lm.info.n_experts == 4 and clean["blocks.1.mlp.hook_router"].shape[1:] == (4,)
    assert set(changed["blocks.1.mlp.hook_router"].argmax(-1).tolist()) == {expert}
    assert not np.allclose(changed["blocks.1.hook_mlp_out"], clean["blocks.1.hook_mlp_out"])


@pytest.mark.parametrize("model_type,layer_name,component,why", [
    ("deepseek_v3", "model.layers.1", "query", "multi-head latent attention"),
    ("deepseek_v3", "blocks.1.attn.hook_v", None, "multi-head latent attention"),
    ("deepseek_v3", "blocks.1.mlp.hook_router", None, "selection module"),  # MoEGate: no linear gives the logits
    ("llama", "blocks.0.mlp.hook_router", None, "mixture-of-experts"),
])
def test_absent_components_are_refused_and_not_listed(model_type, layer_name, component, why):
    from engine.errors import UnknownHook
    from engine.hooks import resolve_hook
    from engine.params import HookSpec

    lm = load_model(str(zoo_model(model_type)))
    with pytest.raises(UnknownHook, match=why):
        resolve_hook(lm, HookSpec(layer_name=layer_name, component=component))
    names = {p["name"] for p in hook_points(lm)}
    assert "blocks.1.attn.hook_pattern" in names  # latent attention still gives exact scores and patterns
    assert (layer_name if component is None else "blocks.1.attn.hook_q") not in names
